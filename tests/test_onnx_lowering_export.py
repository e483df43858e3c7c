"""fffcompile.export (torch -> ONNX with fused nodes), atomic files, and ONNX verification (harden + compare).

Structure and numbers: the exported file holds exactly one fffcompile node per FFF and nothing
soft of it, runs in ONNX Runtime at batch and sequence sizes other than the exported ones, and
equals the torch model (and ``reference.hard``). A soft ONNX original is hardened by name and
compared with the rewritten file; hardening the wrong sigmoids, or none, must fail.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fffcompile
from fffcompile import reference
from fffcompile.errors import InvalidModelError, UserError, VerificationError
from fffcompile.nn import FFF, NeuronTree
from fffcompile.onnx import harden_sigmoids, load_model, save_model_atomic, verify_models
from fffcompile.onnx.contract import DOMAIN
from fffcompile.runtime import FusedFFF
from fffcompile.spec import FFFSpec
from onnx_models import fff_model
from specs import make_spec


class Block(nn.Module):
    """Linear -> FFF with a master leaf (form C) -> NeuronTree (form B) -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.fff = FFF(12, 12, depth=3, leaf_width=4, activation="gelu", master_width=3)
        self.tree = NeuronTree(12, 10, depth=6, trees=2)
        self.out = nn.Linear(10, 4)

    def forward(self, x):
        return self.out(self.tree(torch.relu(self.fff(self.inp(x)))))


def fff_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def run(path_or_model, *arrays):
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), arrays)})


def test_export_fuses_every_fff_and_runs_at_other_shapes(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    path = str(tmp_path / "block.onnx")
    result = fffcompile.export(model, torch.randn(3, 5, 6), path)
    assert result.fff_nodes == {"LeafMLPTree": 1, "NeuronTree": 1}
    assert [len(r) for r in (result.report.rewritten, result.report.left)] == [2, 0]
    assert len(result.checks) == 2 and all(all(c.values()) for c in result.checks.values())
    exported = onnx.load(path)
    onnx.checker.check_model(exported, full_check=True)
    ops = [n.op_type for n in exported.graph.node]
    assert ops.count("LeafMLPTree") == 1 and ops.count("NeuronTree") == 1
    assert "Sigmoid" not in ops[ops.index("LeafMLPTree"):ops.index("NeuronTree")]   # no soft tree left
    dims = [d.dim_param or d.dim_value for d in exported.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] == 6
    for shape in [(1, 1, 6), (7, 2, 6), (2, 17, 6), (0, 3, 6)]:
        x = torch.randn(*shape)
        (got,) = run(path, x.numpy())
        with torch.no_grad():
            want = model(x)
        assert got.shape == tuple(want.shape)
        assert np.allclose(got, want.numpy(), atol=1e-5, rtol=1e-4), shape


def test_export_of_fused_layers_matches_the_reference_and_targets_trt(tmp_path):
    spec_a = make_spec(depth=7, d_in=8, d_out=8, activation="silu", tie="gt", seed=4)
    spec_b = make_spec(form="neuron_tree", depth=3, trees=3, d_in=8, d_out=5, activation="gelu_tanh", seed=5)
    model = nn.Sequential(FusedFFF(spec_a), FusedFFF(spec_b))
    path = str(tmp_path / "fused.onnx")
    result = fffcompile.export(model, torch.randn(4, 8), path, target="trt", optimize=False)
    assert result.report is None and result.fff_nodes == {"LeafMLPTree": 1, "NeuronTree": 1} and not result.notes
    exported = onnx.load(path)
    for node in fff_nodes(exported):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_namespace"] == b"fffcompile" and attributes["plugin_version"] == b"1"
        assert node.overload in {f.overload for f in exported.functions}
    initializers = {i.name: tuple(i.dims) for i in exported.graph.initializer}     # weights feed the node directly
    assert [initializers.get(name) for name in fff_nodes(exported)[0].input[1:]] == [
        (127, 8), (127,), (128, 8, 4), (128, 4), (128, 4, 8), (128, 8)]
    assert [initializers.get(name) for name in fff_nodes(exported)[1].input[1:]] == [(3, 15, 8), (3, 15), (3, 15, 5), (5,)]
    x = torch.randn(33, 8)
    (got,) = run(path, x.numpy())
    want = reference.hard(spec_b, reference.hard(spec_a, x))
    ties = reference.near_ties(spec_a, x) | reference.near_ties(spec_b, reference.hard(spec_a, x))
    assert np.allclose(got[~ties.numpy()], want[~ties].numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_export_of_half_precision_layers(tmp_path, dtype):
    """16-bit FFFs export with their dtype; the body computes in float32 and rounds once, like the reference."""
    spec = make_spec(form="neuron_tree", depth=6, trees=2, d_in=8, d_out=8, dtype=dtype, seed=6)
    path = str(tmp_path / "half.onnx")
    result = fffcompile.export(FusedFFF(spec), torch.randn(5, 8, dtype=dtype), path, optimize=False)
    assert result.fff_nodes == {"NeuronTree": 1} and all(all(c.values()) for c in result.checks.values())
    exported = onnx.load(path)
    assert exported.graph.input[0].type.tensor_type.elem_type == (
        onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.BFLOAT16)
    assert fff_nodes(exported)[0].overload.endswith("_f16" if dtype == torch.float16 else "_bf16")


def test_export_of_a_third_party_fff(tmp_path):
    """The fastfeedforward package's FFF (not exportable as shipped) goes out as one LeafMLPTree node."""
    fastfeedforward = pytest.importorskip("fastfeedforward")
    torch.manual_seed(1)
    layer = fastfeedforward.FFF(8, 4, 6, depth=3).train()
    path = str(tmp_path / "third_party.onnx")
    result = fffcompile.export(layer, torch.randn(16, 8), path)
    assert result.fff_nodes == {"LeafMLPTree": 1}
    exported = onnx.load(path)
    assert {n.op_type for n in exported.graph.node} <= {"LeafMLPTree", "Identity"}
    x = torch.randn(9, 8)
    (got,) = run(path, x.numpy())
    from fffcompile.passes.harden import hardened_sigmoids
    with torch.no_grad(), hardened_sigmoids(rows=9):
        want = layer(x)
    assert np.allclose(got, want.numpy(), atol=1e-5)


def test_export_says_when_the_shape_is_static(tmp_path):
    model = FusedFFF(make_spec(depth=2))
    dynamic = fffcompile.export(model, torch.randn(1, 8), str(tmp_path / "dynamic.onnx"), optimize=False)
    assert not dynamic.notes and len(dynamic.checks) == 2           # batch 1 stays dynamic, checked at 1 and 3
    static = fffcompile.export(model, torch.randn(4, 8), str(tmp_path / "static.onnx"), optimize=False,
                               dynamic_shapes=(None,))
    assert len(static.notes) == 1 and "runs at that shape only" in static.notes[0] and len(static.checks) == 1


def test_export_refuses_bad_paths_and_leaves_nothing_behind(tmp_path):
    model = nn.Sequential(FusedFFF(make_spec(depth=2)))
    with pytest.raises(UserError, match="does not exist"):
        fffcompile.export(model, torch.randn(2, 8), str(tmp_path / "missing" / "m.onnx"))
    with pytest.raises(UserError, match="unknown target"):
        fffcompile.export(model, torch.randn(2, 8), str(tmp_path / "m.onnx"), target="tensorflow")
    assert os.listdir(tmp_path) == []


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_a_failed_export_or_verification_writes_nothing(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous contents")
    with pytest.raises(InvalidModelError, match="torch.onnx.export failed"):
        fffcompile.export(DataDependent(), torch.randn(2, 3), str(target), optimize=False)
    model = nn.Sequential(FusedFFF(make_spec(depth=2)))
    with pytest.raises(VerificationError, match="nothing was written"):
        fffcompile.export(model, torch.randn(3, 8), str(target), optimize=False, atol=-1.0)
    assert target.read_bytes() == b"previous contents"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_save_model_atomic_with_external_data_and_a_failing_check(tmp_path):
    spec = make_spec(form="neuron_tree", depth=4)
    model = fff_model(spec)
    path = str(tmp_path / "ext.onnx")
    written = save_model_atomic(model, path, external_data=True)
    assert written == [path, path + ".data"] and os.path.getsize(path + ".data") > 0
    x = np.random.default_rng(0).standard_normal((5, spec.d_in)).astype(np.float32)
    (got,) = run(path, x)
    assert np.allclose(got, reference.hard(spec, torch.from_numpy(x)).numpy(), atol=1e-5)
    reloaded = load_model(path)
    assert len(reloaded.graph.initializer) == len(fff_model(spec).graph.initializer)

    def refuse(staged):
        assert os.path.exists(staged)
        raise VerificationError("refused by the check")

    with pytest.raises(VerificationError):
        save_model_atomic(fff_model(spec), str(tmp_path / "other.onnx"), check=refuse)
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]


@pytest.mark.parametrize("contents,reason", [(None, "no such file"), (b"", "empty"),
                                             (b"\x08\x07garbage that is not protobuf", "not a readable ONNX"),
                                             ("truncated", "not a readable ONNX")])
def test_load_model_says_what_is_wrong(tmp_path, contents, reason):
    path = tmp_path / "bad.onnx"
    if contents == "truncated":
        contents = fff_model(make_spec(depth=3)).SerializeToString()[:-40]
    if contents is not None:
        path.write_bytes(contents)
    with pytest.raises(InvalidModelError, match=reason):
        load_model(str(path))


def soft_onnx(layer: FFF, path: str, optimize: bool = True) -> onnx.ModelProto:
    """The layer's training (soft) forward exported by torch's dynamo exporter (``optimize=False`` keeps s(k) a node)."""
    layer.train()
    with torch.no_grad():
        torch.onnx.export(layer, (torch.randn(4, layer.in_features),), path, dynamo=True, optimize=optimize,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    return onnx.load(path)


def spec_of(layer: FFF) -> FFFSpec:
    weights = {k: getattr(layer, k).detach() for k in ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2")}
    return FFFSpec("leaf_mlp", layer.depth, layer.activation, tie=layer.tie, **weights)


def test_hardened_original_is_the_exactness_oracle(tmp_path):
    torch.manual_seed(2)
    layer = FFF(8, 5, depth=4, leaf_width=3)
    original = soft_onnx(layer, str(tmp_path / "soft.onnx"))
    sigmoids = [n.name for n in original.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) == 1
    spec = spec_of(layer)
    optimized = fff_model(spec)
    input_name = original.graph.input[0].name
    verification = verify_models(original, optimized, sigmoids=sigmoids, tie_checks=[(spec, input_name)])
    assert verification.passed, verification.summary()
    assert verification.fidelity is not None and not all(verification.fidelity.values())   # an untrained tree is soft
    hardened = harden_sigmoids(original, sigmoids)
    assert [n.op_type for n in hardened.graph.node].count("Sigmoid") == 0
    x = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float32)
    (got,) = run(hardened, x)
    assert np.allclose(got, reference.hard(spec, torch.from_numpy(x)).numpy(), atol=1e-5)
    assert not verify_models(original, optimized).passed              # the soft original is no oracle


def test_the_blend_sigmoid_of_a_master_leaf_is_not_hardened(tmp_path):
    torch.manual_seed(3)
    layer = FFF(8, 5, depth=3, leaf_width=3, master_width=2)
    original = soft_onnx(layer, str(tmp_path / "soft_master.onnx"), optimize=False)
    optimized_path = str(tmp_path / "hard_master.onnx")
    fffcompile.export(layer.eval(), torch.randn(6, 8), optimized_path)
    initializers = {i.name for i in original.graph.initializer}
    tree = [n.name for n in original.graph.node if n.op_type == "Sigmoid" and n.input[0] not in initializers]
    blend = [n.name for n in original.graph.node if n.op_type == "Sigmoid" and n.input[0] in initializers]
    assert len(tree) == 1 and len(blend) == 1
    assert verify_models(original, optimized_path, sigmoids=tree).passed
    assert not verify_models(original, optimized_path, sigmoids=tree + blend).passed


def test_verify_models_reads_npz_inputs_and_says_what_is_missing(tmp_path):
    spec = make_spec(form="neuron_tree", depth=3)
    model = fff_model(spec)
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x=np.random.default_rng(0).standard_normal((11, spec.d_in)).astype(np.float32))
    verification = verify_models(model, model, inputs=str(npz))
    assert verification.passed and verification.inputs == {"x": (11, spec.d_in)}
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, spec.d_in), np.float32))
    with pytest.raises(UserError, match=r"missing input\(s\) \['x'\]"):
        verify_models(model, model, inputs=str(tmp_path / "wrong.npz"))
    other = fff_model(make_spec(form="neuron_tree", depth=3, seed=9))
    failed = verify_models(model, other, inputs=str(npz))
    assert not failed.passed and "FAIL" in failed.summary()
