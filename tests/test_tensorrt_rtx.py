"""CPU-side evidence that TensorRT's ONNX parser accepts the trt-target file, through its
local-function fallback: a parse/build check with the tensorrt-rtx wheel.

TensorRT-RTX is a sibling product of TensorRT (same Python API and ONNX parser lineage, aimed at
RTX GPUs) whose wheel installs from PyPI and builds engines without a GPU. This is therefore not
a TensorRT run: no engine is executed (that needs a GPU), and no fffcompile plugin is registered
(tensorrt-rtx 1.7.1.116 ships ``tensorrt_rtx.plugin`` without the ``tensorrt_rtx_bindings.plugin``
module it imports, so Quickly Deployable Plugins cannot be defined with it). What it shows: the
parser imports each fffcompile node from its model-local function (the layers carry the node's
name and op_type), the network builds into a serialized engine through ``runtime.trt_engine``'s
steps, and the parser's known limits for the exporter.

The files come from the lowering itself (``fffcompile.onnx.fff_node`` via ``tests/onnx_models``),
and, for the path a user runs, from ``fffcompile export IN.onnx --target trt`` on soft FFF files
exported by torch; ONNX Runtime checks the same file's numbers against the reference first, so
the body that TensorRT inlines is the right one.
"""
import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

trt = pytest.importorskip("tensorrt_rtx", reason="the tensorrt-rtx wheel is optional (scripts/install-tensorrt-rtx.sh)")

from fffcompile import reference  # noqa: E402
from fffcompile.compare import compare  # noqa: E402
from fffcompile.errors import InvalidModelError  # noqa: E402
from fffcompile.runtime.trt_engine import build_with  # noqa: E402

from fffcompile.cli import main  # noqa: E402
from fffcompile.onnx import fff_node, insert_fff_nodes  # noqa: E402
from fffcompile.onnx.contract import NodeConfig, attribute, is_fff_node  # noqa: E402

import onnx_fixtures as F  # noqa: E402
from onnx_models import fff_model, run_ort  # noqa: E402
from specs import make_spec, random_input  # noqa: E402

pytestmark = pytest.mark.tensorrt_rtx

CASES = {
    "leaf_mlp_gelu_fp32": dict(form="leaf_mlp", activation="gelu", tie="ge"),
    "leaf_linear_fp16": dict(form="leaf_mlp", linear_leaves=True, activation="identity", tie="gt",
                             dtype=torch.float16),
    "neuron_tree_fp32": dict(form="neuron_tree", trees=3, activation="gelu", tie="gt"),
}


def op_type(spec) -> str:
    return NodeConfig.from_spec(spec).op_type


def parse(model: onnx.ModelProto):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    return builder, network, parser


@pytest.mark.parametrize("case", sorted(CASES))
def test_trt_target_file_parses_and_builds_through_the_local_function(case, tmp_path):
    spec = make_spec(depth=3, d_in=12, d_out=6, leaf_width=5, seed=3, **CASES[case])
    model = fff_model(spec, target="trt", lead=("batch", "tokens"))
    x = random_input(spec, (3, 5), seed=4)
    y = run_ort(model, x)
    atol = 4e-3 if spec.dtype == torch.float16 else None  # ONNX Runtime computes float16 in float16
    assert compare(y, reference.hard(spec, x), atol=atol, rtol=atol, exclude=reference.near_ties(spec, x))

    _, network, _ = parse(model)
    # Layers carry "[ONNX Layer: ... | node (op_type)]"; the parser's own helpers (casts, weight
    # constants, shape slices) carry none.
    origins = collections.Counter(network.get_layer(i).metadata.rsplit("|", 1)[-1].strip()
                                  for i in range(network.num_layers) if network.get_layer(i).metadata)
    assert list(origins) == [f"fff ({op_type(spec)})]"] and origins[f"fff ({op_type(spec)})]"] > 30
    kinds = {network.get_layer(i).type for i in range(network.num_layers)}
    assert trt.LayerType.GATHER in kinds and not kinds & {trt.LayerType.PLUGIN, trt.LayerType.PLUGIN_V3}

    onnx.save(model, tmp_path / "model.onnx")
    built = build_with(trt, tmp_path / "model.onnx", tmp_path / "engines" / "model.plan")
    assert built.plugin_layers == 0 and built.layers == network.num_layers
    assert built.size_bytes == (tmp_path / "engines" / "model.plan").stat().st_size > 10_000
    assert [p.name for p in (tmp_path / "engines").iterdir()] == ["model.plan"]


def test_a_node_with_neither_plugin_nor_local_function_is_one_error_and_no_engine(tmp_path):
    model = fff_model(make_spec(depth=2, seed=5))
    del model.functions[:]
    onnx.save(model, tmp_path / "bare.onnx")
    with pytest.raises(InvalidModelError, match="TensorRT's ONNX parser rejected the file: .*Plugin not found"):
        build_with(trt, tmp_path / "bare.onnx", tmp_path / "bare.plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.onnx"]


def _gathers(network) -> collections.Counter:
    return collections.Counter(network.get_layer(i).metadata.rsplit("|", 1)[-1].strip()
                               for i in range(network.num_layers)
                               if network.get_layer(i).type == trt.LayerType.GATHER and network.get_layer(i).metadata)


def test_parser_binds_local_functions_by_op_type_alone(tmp_path):
    # The exporter's constraint, measured: two LeafMLPTree nodes of depths 7 and 6 whose functions
    # are told apart by ONNX's function overload (as fff_node writes them). ONNX Runtime honours the
    # overloads; TensorRT's parser keys local functions by name only and inlines the first body for
    # both nodes (the depth-7 body: 2 per-level gathers below the 5-level top block, 2 for the leaf,
    # 3 that reorder the weights),
    # so the depth-6 node would run a depth-7 descent. Function bodies must therefore not depend on
    # anything but the inputs' shapes, or each distinct body needs its own op_type.
    deep = make_spec(depth=7, d_in=8, d_out=8, leaf_width=4, seed=1)
    shallow = make_spec(depth=6, d_in=8, d_out=8, leaf_width=4, seed=2)
    alone = {spec.depth: _gathers(parse(fff_model(spec))[1])["fff (LeafMLPTree)]"] for spec in (deep, shallow)}
    assert alone == {7: 7, 6: 6}
    graph = helper.make_graph([], "two", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = insert_fff_nodes(model, [fff_node(deep, "x", "hidden", name="fff"), fff_node(shallow, "hidden", "y", name="fff2")])
    assert sorted(f.overload for f in model.functions) == ["d6_relu_ge_f32", "d7_relu_ge_f32"]
    onnx.checker.check_model(model, full_check=True)

    x = random_input(deep, (16,), seed=3)
    expected = reference.hard(shallow, reference.hard(deep, x))
    assert np.abs(run_ort(model, x).numpy() - expected.numpy()).max() < 1e-5

    assert _gathers(parse(model)[1]) == {"fff (LeafMLPTree)]": 7, "fff2 (LeafMLPTree)]": 7}


@pytest.mark.parametrize("name, op", [("fff", "LeafMLPTree"), ("neuron_tree", "NeuronTree")])
def test_cli_trt_export_of_a_torch_file_parses_and_builds(name, op, tmp_path, capsys):
    # The path a user runs: a training-mode FFF layer exported by torch (form A, form B), then
    # `fffcompile export IN --target trt -o OUT`, then OUT parsed and built by the parser.
    src, out = F.exported(name, "dynamo"), tmp_path / "model.trt.onnx"
    assert main(["export", src, "--target", "trt", "-o", str(out)]) == 0, capsys.readouterr().err
    model = onnx.load(str(out))
    nodes = [n for n in model.graph.node if is_fff_node(n)]
    assert [n.op_type for n in nodes] == [op]
    assert attribute(nodes[0], "plugin_namespace") == b"fffcompile" and attribute(nodes[0], "plugin_version") == b"1"

    _, network, _ = parse(model)
    kinds = {network.get_layer(i).type for i in range(network.num_layers)}
    assert trt.LayerType.GATHER in kinds and not kinds & {trt.LayerType.PLUGIN, trt.LayerType.PLUGIN_V3}
    built = build_with(trt, out, tmp_path / "engines" / "model.plan")
    assert built.plugin_layers == 0 and built.layers == network.num_layers
    assert built.size_bytes == (tmp_path / "engines" / "model.plan").stat().st_size > 10_000
