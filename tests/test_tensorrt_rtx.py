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

The files come from the test-local builder ``fff_onnx_node`` (the exporter's stand-in); ONNX
Runtime checks the same file's numbers against the reference first, so the body that TensorRT
inlines is the right one.
"""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

trt = pytest.importorskip("tensorrt_rtx", reason="the tensorrt-rtx wheel is optional (scripts/install-tensorrt-rtx.sh)")

from fffcompile import reference  # noqa: E402
from fffcompile.compare import compare  # noqa: E402
from fffcompile.errors import InvalidModelError  # noqa: E402
from fffcompile.runtime.trt_engine import build_with  # noqa: E402

from fff_onnx_node import fff_model, op_type  # noqa: E402
from specs import make_spec, random_input  # noqa: E402

pytestmark = pytest.mark.tensorrt_rtx

CASES = {
    "leaf_mlp_gelu_fp32": dict(form="leaf_mlp", activation="gelu", tie="ge"),
    "leaf_linear_fp16": dict(form="leaf_mlp", linear_leaves=True, activation="identity", tie="gt",
                             dtype=torch.float16),
    "neuron_tree_fp32": dict(form="neuron_tree", trees=3, activation="gelu", tie="gt"),
}


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
    model = fff_model(spec, lead_dims=("batch", "tokens"))
    x = random_input(spec, (3, 5), seed=4)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(session.run(None, {"X": x.numpy()})[0])
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


def test_parser_binds_local_functions_by_op_type_alone(tmp_path):
    # The exporter's constraint, measured: two LeafMLPTree nodes of depths 3 and 2 whose functions
    # are told apart by ONNX's function overload. ONNX Runtime honours the overloads; TensorRT's
    # parser keys local functions by name only and inlines the first body for both nodes (10
    # gathers each: 2 per level of depth 3, 4 for the leaf), so a depth-2 node would run a depth-3
    # descent. Function bodies must therefore not depend on anything but the inputs' shapes, or
    # each distinct body needs its own op_type.
    deep = make_spec(depth=3, d_in=8, d_out=8, leaf_width=4, seed=1)
    shallow = make_spec(depth=2, d_in=8, d_out=8, leaf_width=4, seed=2)
    first, second = fff_model(deep), fff_model(shallow)
    first.functions[0].overload, first.graph.node[0].overload = "depth3", "depth3"
    second.functions[0].overload, second.graph.node[0].overload = "depth2", "depth2"
    node_b = second.graph.node[0]
    node_b.name = "fff2"
    first.graph.node[0].output[0] = "hidden"
    node_b.input[:] = ["hidden"] + [f"b_{name}" for name in node_b.input[1:]]
    for initializer in second.graph.initializer:
        initializer.name = f"b_{initializer.name}"
    graph = onnx.helper.make_graph([first.graph.node[0], node_b], "two", first.graph.input, first.graph.output,
                                   list(first.graph.initializer) + list(second.graph.initializer))
    model = onnx.helper.make_model(graph, functions=[first.functions[0], second.functions[0]],
                                   opset_imports=first.opset_import, ir_version=10)
    onnx.checker.check_model(model, full_check=True)

    x = random_input(deep, (16,), seed=3)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x.numpy()})[0]
    expected = reference.hard(shallow, reference.hard(deep, x))
    assert np.abs(y - expected.numpy()).max() < 1e-5

    _, network, _ = parse(model)
    gathers = collections.Counter(network.get_layer(i).metadata.rsplit("|", 1)[-1].strip()
                                  for i in range(network.num_layers)
                                  if network.get_layer(i).type == trt.LayerType.GATHER)
    assert gathers == {"fff (LeafMLPTree)]": 10, "fff2 (LeafMLPTree)]": 10}
