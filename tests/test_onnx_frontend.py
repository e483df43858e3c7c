"""The ONNX frontend on files exported by both torch exporters: structure after the rewrite and numbers.

Every positive case must come out with exactly its number of fffcompile nodes and, in ONNX
Runtime at batch/sequence sizes other than the exported ones, equal (1e-4 relative) both the
original with its router sigmoids hardened and an independent hard reference: the torch layer's
own hard (eval) forward or ``reference.hard`` of the spec built from its parameters. The spec
read back from the rewritten node equals that spec. Look-alikes come out untouched.
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from fffcompile import reference
from fffcompile.compare import compare
from fffcompile.nn import FFF
from fffcompile.onnx.contract import LEAF_LINEAR_TREE, NEURON_TREE, attribute, is_fff_node
from fffcompile.onnx.files import load_model
from fffcompile.onnx.harden import harden_sigmoids
from fffcompile.onnx.onnx_frontend import hardening_of, optimize_onnx
from fffcompile.onnx.verify import run
from fffcompile.spec import FFFSpec

import onnx_fixtures as F

POSITIVE = [(name, exporter) for name, case in F.CASES.items() if case.fff_nodes and not case.all_or_nothing
            for exporter in case.exporters]
LOOK_ALIKES = [(name, exporter) for name, case in F.CASES.items() if not case.fff_nodes for exporter in case.exporters]
ALL_OR_NOTHING = [(name, exporter) for name, case in F.CASES.items() if case.all_or_nothing for exporter in case.exporters]


def fff_nodes(model):
    return [n for n in model.graph.node if is_fff_node(n)]


def spec_of_node(model: onnx.ModelProto, node: onnx.NodeProto) -> FFFSpec:
    """The FFFSpec a rewritten node carries (its weight initializers and attributes)."""
    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    w = [weights[name] for name in node.input[1:]]
    text = lambda name: attribute(node, name).decode()
    depth = attribute(node, "depth")
    if node.op_type == NEURON_TREE:
        return FFFSpec(form="neuron_tree", depth=depth, activation=text("activation"), node_weight=w[0], node_bias=w[1],
                       out_weight=w[2], out_bias=w[3], tie=text("tie"), source="hard")
    if node.op_type == LEAF_LINEAR_TREE:
        return FFFSpec(form="leaf_mlp", depth=depth, activation=text("activation"), node_weight=w[0], node_bias=w[1],
                       leaf_w1=w[2], leaf_b1=w[3], tie=text("tie"))
    return FFFSpec(form="leaf_mlp", depth=depth, activation=text("activation"), node_weight=w[0], node_bias=w[1],
                   leaf_w1=w[2], leaf_b1=w[3], leaf_w2=w[4], leaf_b2=w[5], tie=text("tie"))


def hard_reference(name: str, x: torch.Tensor):
    """The layer's hard output computed without ONNX: its own eval forward, or reference.hard of its true spec."""
    module, _ = F.case(name)
    if name in ("unrolled", "linear_leaves", "fastfeedforward", "hard_tree", "signed_path", "one_hot_pick") \
            or hasattr(module, "true_spec"):
        # (the package's eval forward omits b2s; a gallery style has no hard forward of its own)
        return reference.hard(F.CASES[name].true_spec(module), x)
    if name == "soft_tree":
        return None
    with torch.no_grad():
        y = copy.deepcopy(module).eval()(x)
    return y[0] if isinstance(y, tuple) else y              # the tests compare the first output


def other_shapes(name):
    shape = F.CASES[name].input_shape
    return [(7,) + shape[1:], (1,) + shape[1:]] if len(shape) == 2 else [(3, 9) + shape[2:], (1, 2) + shape[2:]]


@pytest.fixture(scope="module")
def rewritten():
    cache = {}

    def get(name, exporter, target="onnx"):
        key = (name, exporter, target)
        if key not in cache:
            original = load_model(F.exported(name, exporter))
            cache[key] = (original, *optimize_onnx(original, target))
        return cache[key]
    return get


def assert_close(actual, expected, what):
    actual, expected = torch.as_tensor(np.asarray(actual)).double(), torch.as_tensor(np.asarray(expected)).double()
    scale = max(1.0, float(expected.abs().max()))
    result = compare(actual, expected, atol=1e-5 * scale, rtol=1e-4)
    assert result.passed, f"{what}: {result.summary()}"


@pytest.mark.parametrize("name,exporter", POSITIVE)
def test_rewrite_structure_and_numbers(rewritten, name, exporter):
    original, optimized, report = rewritten(name, exporter)
    nodes = fff_nodes(optimized)
    assert len(nodes) == F.CASES[name].fff_nodes, str(report)
    assert len(report.rewritten) == len(nodes)
    onnx.checker.check_model(optimized)
    # dynamic leading dims survive
    for value in optimized.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value"), f"input {value.name} lost its dynamic batch dim"
    named, sigmoids, _ = hardening_of(original)
    hardened = harden_sigmoids(named, sigmoids) if sigmoids else named
    rng = np.random.default_rng(0)
    input_name = original.graph.input[0].name
    for shape in other_shapes(name):
        x = rng.standard_normal(shape).astype(np.float32)
        got = next(iter(run(optimized, {input_name: x}).values()))
        want = next(iter(run(hardened, {input_name: x}).values()))
        assert_close(got, want, f"{name}/{exporter} vs the hardened original at {shape}")
        independent = hard_reference(name, torch.from_numpy(x))
        if independent is not None:
            assert_close(got, independent, f"{name}/{exporter} vs the layer's own hard forward at {shape}")


@pytest.mark.parametrize("name,exporter", [p for p in POSITIVE if F.CASES[p[0]].true_spec])
def test_extracted_spec_is_the_layers_spec(rewritten, name, exporter):
    _, optimized, _ = rewritten(name, exporter)
    module, x = F.case(name)
    true = F.CASES[name].true_spec(module)
    (node,) = fff_nodes(optimized)
    extracted = spec_of_node(optimized, node)
    assert extracted.same_as(true, atol=1e-5, rtol=1e-4), f"{extracted.describe()} vs {true.describe()}"
    assert_close(reference.hard(extracted, x), reference.hard(true, x), "reference.hard of both specs")


@pytest.mark.parametrize("name,exporter", LOOK_ALIKES)
def test_look_alikes_untouched(name, exporter):
    original = load_model(F.exported(name, exporter))
    optimized, report = optimize_onnx(original, "onnx")
    assert not fff_nodes(optimized) and not report.rewritten
    assert [n.op_type for n in optimized.graph.node] == [n.op_type for n in original.graph.node]
    assert optimized.SerializeToString() == original.SerializeToString()


@pytest.mark.parametrize("name,exporter", ALL_OR_NOTHING)
def test_whole_tree_or_nothing(name, exporter):
    """A tree whose first levels look like a smaller tree with sigmoid leaves: rewritten whole (exact against
    its own hard forward) or not at all, with a reason; never a part of it with the rest left soft."""
    original = load_model(F.exported(name, exporter))
    optimized, report = optimize_onnx(original, "onnx")
    module, _ = F.case(name)
    if not fff_nodes(optimized):
        assert optimized.SerializeToString() == original.SerializeToString()
        assert report.left and all(entry.reason for entry in report.left), str(report)
        return
    assert len(fff_nodes(optimized)) == F.CASES[name].fff_nodes and report.rewritten[0].depth == module.depth
    rng = np.random.default_rng(0)
    for shape in other_shapes(name):
        x = rng.standard_normal(shape).astype(np.float32)
        got = next(iter(run(optimized, {original.graph.input[0].name: x}).values()))
        assert_close(got, hard_reference(name, torch.from_numpy(x)), f"{name}/{exporter} vs its hard forward at {shape}")


def test_part_of_a_mixture_is_refused_with_its_reason():
    """The per-level tree (dynamo): the first two levels confirm as a depth-2 tree on their own, but the third
    level's sigmoid would stay soft inside the region: refused, and the reason says so."""
    from fffcompile.onnx.detect import find_candidates, split_by_outputs
    from fffcompile.onnx.graph_index import GraphIndex
    from fffcompile.onnx.mixture_guard import soft_routers_mixing
    from fffcompile.onnx.onnx_frontend import _confirm, _name_anchors
    model = load_model(F.exported("per_level_bmm", "dynamo"))
    _name_anchors(model)
    index = GraphIndex(model)
    (candidate,) = [c for c in find_candidates(index) if c.form == "A"]
    assert len(candidate.anchors) == 3
    first, _ = split_by_outputs(index, candidate)
    assert len(first.anchors) == 2
    result, reasons = _confirm(index, first, first.where(index), set())
    assert result is None
    assert any("part of a larger mixture" in r for r in reasons), reasons


@pytest.mark.parametrize("name", ["not_a_tree", "swapped_children", "gated_residual", "glu", "log_space_tree", "gated_fff"])
def test_look_alike_refusals_have_reasons(name):
    _, report = optimize_onnx(load_model(F.exported(name, "dynamo")), "onnx")
    assert report.left and all(entry.reason for entry in report.left)
    assert "no FFF layer" in " ".join(report.notes)
    if name == "gated_fff":               # confirmed alone, but its output is multiplied by a soft gate of X
        assert any("part of a larger mixture" in entry.reason for entry in report.left), str(report)
    if name == "log_space_tree":          # found, though of no layout the extractors read: said so
        assert any("log-space" in entry.reason for entry in report.left), str(report)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_bfloat16_model_rewritten_exactly(tmp_path, exporter):
    """A bfloat16 export read through its float32 twin: one node with bfloat16 weights, equal to reference.hard of
    the layer's spec at other batch sizes. (verify=False: ONNX Runtime has no bfloat16 Einsum kernel, so the original
    does not run there; the rewritten file does.)"""
    module, x = F.case("fff")
    module = copy.deepcopy(module).to(torch.bfloat16)
    path = F.export(module, x.to(torch.bfloat16), str(tmp_path / "bf16.onnx"), exporter)
    original = load_model(path)
    optimized, report = optimize_onnx(original, "onnx", verify=False)
    (node,) = fff_nodes(optimized)
    spec = F._spec_fff(module)
    for rows in (1, 7):
        xs = np.random.default_rng(rows).standard_normal((rows, 12)).astype(np.float32)
        got = np.asarray(next(iter(run(optimized, {original.graph.input[0].name: xs}).values())), np.float32)
        want = reference.hard(spec, torch.from_numpy(xs).to(torch.bfloat16)).float()
        result = compare(torch.from_numpy(got), want, atol=2e-2 * max(1.0, float(want.abs().max())), rtol=2e-2,
                         exclude=reference.near_ties(spec, torch.from_numpy(xs).to(torch.bfloat16)))
        assert result.passed, f"bfloat16/{exporter} at {rows} rows: {result.summary()}"


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_eval_mode_row_gather_descent_computing_every_leaf(tmp_path, exporter):
    """The per-level tree exported in eval mode: its hard descent gathers each node's weight row, then a row-wise
    dot, and picks the reached leaf from every leaf's output (leaves run densely as a leaf-major bmm; no leaf
    table is gathered). The leaves are read by numbers: one node, equal to reference.hard of the layer's own
    spec at other batch sizes."""
    module, x = F.case("per_level_bmm")
    path = F.export(copy.deepcopy(module).eval(), x, str(tmp_path / "eval.onnx"), exporter)
    original = load_model(path)
    optimized, report = optimize_onnx(original, "onnx")
    assert len(fff_nodes(optimized)) == 1, str(report)
    true = F._spec_per_level_bmm(module)
    for rows in (1, 9):
        xs = np.random.default_rng(rows).standard_normal((rows, x.shape[1])).astype(np.float32)
        got = next(iter(run(optimized, {original.graph.input[0].name: xs}).values()))
        assert_close(got, reference.hard(true, torch.from_numpy(xs)), f"eval-mode descent/{exporter} at {rows} rows")


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_hard_descent_picking_a_computed_leaf(tmp_path, exporter):
    """A hard descent over every node's logit (gather per level, >= 0) whose leaves all run densely (one einsum)
    and whose output is the reached leaf's, picked by a gather (GatherND; Flatten + Gather in a legacy export)."""
    import graph_gallery
    from specs import make_spec
    spec = make_spec(depth=3, d_in=8, d_out=5, activation="tanh", seed=9, source="hard")
    path = F.export(graph_gallery.HardDense(spec), torch.randn(4, 8), str(tmp_path / "dense.onnx"), exporter)
    original = load_model(path)
    optimized, report = optimize_onnx(original, "onnx")
    (node,) = fff_nodes(optimized)
    assert spec_of_node(optimized, node).same_as(spec, atol=1e-5, rtol=1e-4)
    for rows in (1, 7):
        xs = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
        got = next(iter(run(optimized, {original.graph.input[0].name: xs}).values()))
        assert_close(got, reference.hard(spec, torch.from_numpy(xs)), f"dense-leaf descent/{exporter} at {rows} rows")


def test_trt_target_nodes_carry_plugin_attributes(rewritten):
    _, optimized, _ = rewritten("stack", "legacy", "trt")
    nodes = fff_nodes(optimized)
    assert len(nodes) == 3
    for node in nodes:
        assert attribute(node, "plugin_namespace") == b"fffcompile" and attribute(node, "plugin_version") == b"1"
    _, plain, _ = rewritten("stack", "legacy", "onnx")
    assert all(attribute(n, "plugin_namespace") is None for n in fff_nodes(plain))


def test_form_c_keeps_the_master_leaf_and_blend(rewritten):
    original, optimized, report = rewritten("fff_master", "dynamo")
    assert [r.form for r in report.rewritten] == ["A"]
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("LeafMLPTree") == 1
    assert ops.count("MatMul") == 2 and "Relu" in ops     # the master MLP stays dense
    (node,) = fff_nodes(optimized)
    blend = [n for n in optimized.graph.node if node.output[0] in n.input]
    assert [n.op_type for n in blend] == ["Mul"]          # s(k) * tree(x), then + (1 - s(k)) * master(x)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_leaf_major_trees_and_their_form_c(rewritten, exporter):
    """Leaves as one bmm over x expanded to (L, rows, d) (rows in the middle dim): the per-level tree is rewritten
    whole; around it a master MLP and the blend s(k) stay dense, and the trt target's node carries the plugin
    attributes. Numbers at other batch sizes: the layer's own hard forward and reference.hard of its spec."""
    _, optimized, report = rewritten("per_level_bmm", exporter)
    assert len(fff_nodes(optimized)) == 1 and report.rewritten[0].depth == 3, str(report)
    original, optimized, report = rewritten("leaf_major_master", exporter, "trt")
    (node,) = fff_nodes(optimized)
    assert [r.form for r in report.rewritten] == ["A"] and node.domain == "fffcompile"
    assert attribute(node, "plugin_namespace") == b"fffcompile" and attribute(node, "plugin_version") == b"1"
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("LeafMLPTree") == 1 and "Erf" in ops                 # the master MLP stays dense
    assert [n.op_type for n in optimized.graph.node if node.output[0] in n.input] == ["Mul"]   # s(k) * tree(x)
    module, _ = F.case("leaf_major_master")
    tree_spec = F._spec_per_level_bmm(module.tree)
    assert spec_of_node(optimized, node).same_as(tree_spec, atol=1e-5, rtol=1e-4)
    rng = np.random.default_rng(1)
    for rows in (1, 6, 33):
        x = rng.standard_normal((rows, 9)).astype(np.float32)
        got = next(iter(run(optimized, {original.graph.input[0].name: x}).values()))
        xt = torch.from_numpy(x)
        with torch.no_grad():
            s = torch.sigmoid(module.k)
            want = s * reference.hard(tree_spec, xt) + (1 - s) * module.m2(torch.nn.functional.gelu(module.m1(xt)))
        assert_close(got, want, f"leaf_major_master/{exporter} vs reference.hard blended at {rows} rows")


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("name", ["fff", "fff_master", "neuron_tree", "flat_table_descent", "hard_tree", "signed_path",
                                  "one_hot_pick"])
def test_float16_models(tmp_path, name, exporter):
    """A half-precision export: read through its float32 twin, the node and its weights stay float16 (the body
    computes in float32, as reference.hard does); equal to reference.hard of the layer's own spec at other batch
    sizes to float16 tolerance, and the whole-model check against the original passes."""
    from fffcompile.compare import default_tolerance
    module, x = F.case(name)
    module = copy.deepcopy(module).half()                          # F.case is cached: never change its module
    path = F.export(module, x.half(), str(tmp_path / f"{name}.onnx"), exporter)
    original = load_model(path)
    optimized, report = optimize_onnx(original, "onnx")            # verify=True: the exactness check ran
    (node,) = fff_nodes(optimized)
    weights = {t.name: t for t in optimized.graph.initializer}
    assert all(weights[i].data_type == onnx.TensorProto.FLOAT16 for i in node.input[1:])
    spec = spec_of_node(optimized, node)
    if F.CASES[name].true_spec:
        assert spec.dtype == torch.float16 and spec.same_as(F.CASES[name].true_spec(module), atol=0, rtol=0)
    atol, rtol = default_tolerance(torch.float16)
    rng = np.random.default_rng(2)
    for rows in (1, 9):
        xs = rng.standard_normal((rows, x.shape[-1])).astype(np.float16)
        got = next(iter(run(optimized, {original.graph.input[0].name: xs}).values()))
        want = reference.hard(spec, torch.from_numpy(xs))
        if name == "fff_master":               # the master MLP and the blend are the original's float16 ops
            want = next(iter(run(harden_sigmoids(*hardening_of(original)[:2]), {original.graph.input[0].name: xs}).values()))
        want = torch.as_tensor(np.asarray(want, np.float32))
        result = compare(torch.from_numpy(got.astype(np.float32)), want, atol=atol * max(1.0, float(want.abs().max())),
                         rtol=rtol, exclude=reference.near_ties(spec, torch.from_numpy(xs)))
        assert result.passed, f"{name}/{exporter} float16 at {rows} rows: {result.summary()}"


@pytest.mark.parametrize("exporter,opset", [("dynamo", 17), ("legacy", 18), ("legacy", 14)])
def test_other_opsets(exporter, opset):
    original = load_model(F.exported("ultrafastbert", exporter, opset))
    optimized, report = optimize_onnx(original, "onnx")
    assert len(fff_nodes(optimized)) == 1, str(report)


def test_external_data(tmp_path):
    path = F.exported("fff", "legacy", external_data=True)
    assert os.path.exists(path + ".data") or any(f.endswith(".data") for f in os.listdir(os.path.dirname(path)))
    original = load_model(path)
    optimized, report = optimize_onnx(original, "onnx")
    assert len(fff_nodes(optimized)) == 1


def test_deep_soft_tree_in_seconds():
    torch.manual_seed(0)
    module = FFF(32, 16, 10, 4).train()
    path = F.export(module, torch.randn(3, 32), os.path.join(F._directory(), "deep.onnx"), "legacy")
    original = load_model(path)
    start = time.perf_counter()
    optimized, report = optimize_onnx(original, "onnx", verify=False)
    elapsed = time.perf_counter() - start
    assert len(fff_nodes(optimized)) == 1 and report.rewritten[0].depth == 10
    assert elapsed < 20, f"depth-10 soft tree took {elapsed:.1f} s"
    x = torch.randn(6, 32)
    got = next(iter(run(optimized, {original.graph.input[0].name: x.numpy()}).values()))
    assert_close(got, copy.deepcopy(module).eval()(x).detach(), "depth 10 vs the layer's hard forward")


@seed(20261123)
@settings(max_examples=6, deadline=None)
@given(depth=st.integers(1, 4), d_in=st.integers(2, 9), width=st.integers(1, 5), d_out=st.integers(1, 6),
       activation=st.sampled_from(["relu", "gelu", "gelu_tanh", "tanh"]), exporter=st.sampled_from(["legacy", "dynamo"]))
def test_property_extract_equals_spec(tmp_path_factory, depth, d_in, width, d_out, activation, exporter):
    """Random FFF layers, exported and read back: the extracted spec is the layer's spec (seed printed by hypothesis)."""
    torch.manual_seed(depth * 1000 + d_in * 100 + width * 10 + d_out)
    module = FFF(d_in, d_out, depth, width, activation=activation).train()
    path = str(tmp_path_factory.mktemp("prop") / "m.onnx")
    F.export(module, torch.randn(4, d_in), path, exporter)
    optimized, report = optimize_onnx(load_model(path), "onnx")
    (node,) = fff_nodes(optimized)
    assert spec_of_node(optimized, node).same_as(F._spec_fff(module), atol=1e-5, rtol=1e-4)


@seed(20261124)
@settings(max_examples=25, deadline=None)
@given(lead=st.integers(1, 9), rows=st.integers(1, 12), width=st.integers(1, 5), rows_axis=st.integers(0, 2))
def test_probe_rows_in_any_axis_round_trip(lead, rows, width, rows_axis):
    """``row_axes`` finds the rows of a value laid out with them in any axis (a leaf-major (L, R, k) value among
    them) from R and R + 1 rows; ``rows_as`` lays (R, L k) rows out that way and ``columns`` reads them back."""
    from fffcompile.onnx.probes import columns, row_axes, rows_as
    rng = np.random.default_rng(lead * 100 + rows * 10 + width)

    def layout(r):
        dims = [lead, width]
        dims.insert(rows_axis, r)
        return tuple(dims)
    values = rng.standard_normal((rows, lead * width))
    small = rows_as(values, layout(rows), rows, rows_axis)
    assert small.shape == layout(rows)
    axes = row_axes({"v": small}, {"v": np.zeros(layout(rows + 1))})
    if all(d == 1 for d in layout(rows)[:rows_axis]):
        assert "v" not in axes                       # only 1s before the rows: the default reading applies
    else:
        assert axes["v"] == rows_axis
    assert np.array_equal(columns(small, rows, axes.get("v")), values)


def test_nan_expected_values_do_not_pass_a_comparison():
    """compare: a NaN (or inf) in the expected output must fail against a finite value (a NaN bound is no pass);
    equal non-finites still pass. The hardened original of a log-space path-matrix tree used to be all NaN
    (log 0 * 0), which made its confirmation vacuous: harden floors a logged step at the dtype's tiny."""
    nan, inf = float("nan"), float("inf")
    assert not compare(torch.tensor([[1.0, 2.0]]), torch.tensor([[nan, 2.0]])).passed
    assert not compare(torch.tensor([[1.0, 2.0]]), torch.tensor([[inf, 2.0]])).passed
    assert compare(torch.tensor([[nan, inf]]), torch.tensor([[nan, inf]])).passed
    original = load_model(F.exported("path_matrix", "dynamo"))
    named, sigmoids, _ = hardening_of(original)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    hardened = next(iter(run(harden_sigmoids(named, sigmoids), {original.graph.input[0].name: x}).values()))
    assert np.isfinite(hardened).all()
    module, _ = F.case("path_matrix")
    assert_close(hardened, reference.hard(module.true_spec, torch.from_numpy(x)), "hardened log-space original")


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_sigmoid_leaves_stay_soft_when_hardened(rewritten, exporter):
    """A tree with sigmoid leaf activations: one router sigmoid is its decision (hardened for verification), the
    leaf sigmoid is its activation (left soft), and the rewrite equals the layer's spec."""
    original, optimized, report = rewritten("fff_sigmoid", exporter)
    assert len(fff_nodes(optimized)) == 1 and report.rewritten[0].description.count("sigmoid") == 1, str(report)
    named, sigmoids, _ = hardening_of(original)
    all_sigmoids = [n.name for n in named.graph.node if n.op_type == "Sigmoid"]
    assert len(all_sigmoids) == 2 and len(sigmoids) == 1, (all_sigmoids, sigmoids)
    hardened = harden_sigmoids(named, sigmoids)
    assert [n.name for n in hardened.graph.node if n.op_type == "Sigmoid"] == [s for s in all_sigmoids if s not in sigmoids]
