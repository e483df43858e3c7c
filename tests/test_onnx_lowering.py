"""The fffcompile ONNX node and its function body against ``fffcompile.reference``.

Every random spec (forms A with MLP or linear leaves, B with several trees, every activation,
both tie rules, float32/float64/float16/bfloat16, depth 0 included) is built with ``fff_node``,
checked by onnx.checker and shape inference, and run in ONNX Runtime and in onnx's reference
evaluator on inputs with one or two leading dims (batch 0 and 1 included); the outputs must
equal ``reference.hard`` with near-tie rows excluded. (ONNX Runtime's CPU provider has no float64
Erf, so float64 gelu runs in the reference evaluator only; the original layer has the same limit.)
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from fffcompile import reference
from fffcompile.compare import compare, default_tolerance
from fffcompile.errors import InvalidModelError
from fffcompile.onnx import attach_functions, fff_configurations, fff_node, insert_fff_nodes
from fffcompile.onnx.attach import raise_opset
from fffcompile.onnx.contract import DOMAIN, MIN_OPSET, NodeConfig
from fffcompile.onnx.function_body import TOP_BLOCK_LEVELS, block_paths, descent_order
from fffcompile.spec import ACTIVATIONS
from onnx_models import fff_model, run_ort, run_reference
from specs import batch_shapes, make_spec, random_input, specs


def onnxruntime_runs(spec) -> bool:
    """ONNX Runtime 1.32's CPU provider has no float64 Erf (nor Gelu), so float64 gelu bodies run only elsewhere."""
    return not (spec.dtype == torch.float64 and spec.activation == "gelu")


def assert_matches_reference(spec, x, actual, tolerance_dtype=None):
    expected = reference.hard(spec, x)
    atol, rtol = default_tolerance(tolerance_dtype or spec.dtype)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    result = compare(actual.to(expected.dtype), expected, atol=atol * scale, rtol=rtol,
                     exclude=reference.near_ties(spec, x))
    assert result, f"{spec.describe()}, input {tuple(x.shape)}: {result.summary()}"
    assert result.rows + result.ties_excluded == x.numel() // spec.d_in


@settings(max_examples=120)
@given(spec=specs(max_depth=7, master=False), lead=batch_shapes(), seed=st.integers(0, 2 ** 16))
def test_function_body_equals_reference_in_onnxruntime(spec, lead, seed):
    assume(onnxruntime_runs(spec))
    model = fff_model(spec, lead=tuple(f"d{i}" for i in range(len(lead))))
    x = random_input(spec, lead, seed)
    y = run_ort(model, x)
    assert tuple(y.shape) == (*lead, spec.d_out)
    assert_matches_reference(spec, x, y)


@settings(max_examples=60)
@given(spec=specs(max_depth=6, max_width=12, master=False), lead=batch_shapes(), seed=st.integers(0, 2 ** 16))
def test_function_body_equals_reference_in_onnx_reference_evaluator(spec, lead, seed):
    model = fff_model(spec, lead=tuple(f"d{i}" for i in range(len(lead))))
    x = random_input(spec, lead, seed)
    y = run_reference(model, x)
    assert tuple(y.shape) == (*lead, spec.d_out)
    float32_erf = spec.dtype == torch.float64 and spec.activation == "gelu"     # onnx.reference's Erf is float32
    assert_matches_reference(spec, x, y, torch.float32 if float32_erf else None)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("form,depth", [("leaf_mlp", 0), ("leaf_mlp", 2), ("leaf_mlp", TOP_BLOCK_LEVELS + 3),
                                        ("neuron_tree", 0), ("neuron_tree", TOP_BLOCK_LEVELS + 2)])
def test_every_activation_and_depth_around_the_top_block(form, depth, activation):
    """Depth 0, a tree inside the dense top block, and deeper trees that continue level by level."""
    for tie in ("ge", "gt"):
        spec = make_spec(form=form, depth=depth, activation=activation, tie=tie, trees=3, d_in=6, d_out=4, seed=depth)
        x = random_input(spec, (64,), seed=1)
        assert_matches_reference(spec, x, run_ort(fff_model(spec), x))


@pytest.mark.parametrize("tie", ["ge", "gt"])
@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_exact_ties_follow_the_tie_rule(form, tie):
    """Zero input and zero biases make every logit exactly 0: "ge" goes right, "gt" left, at every level."""
    spec = make_spec(form=form, depth=TOP_BLOCK_LEVELS + 2, tie=tie, trees=2)
    spec = spec.replace(node_bias=torch.zeros_like(spec.node_bias))
    x = torch.zeros(3, spec.d_in)
    leaf = reference.route(spec, x).leaf
    assert bool((leaf == (spec.n_leaves - 1 if tie == "ge" else 0)).all())
    expected = reference.hard(spec, x)
    for y in (run_ort(fff_model(spec), x), run_reference(fff_model(spec), x)):
        assert torch.allclose(y, expected, atol=1e-6)


def test_block_paths_score_the_reached_leaf_uniquely():
    """The top block's leaf is argmax of signs . C: the reached leaf scores K, every other at most K - 2."""
    for levels in range(1, TOP_BLOCK_LEVELS + 1):
        turns, visited = block_paths(levels)
        for leaf in range(2 ** levels):
            signs = np.full(2 ** levels - 1, 7.0)            # off-path values must not matter
            node = 0
            for level in range(levels):
                right = (leaf >> (levels - 1 - level)) & 1
                assert visited[leaf, level] == node
                signs[node] = 1.0 if right else -1.0
                node = 2 * node + 1 + right
            signs[[n for n in range(2 ** levels - 1) if n not in visited[leaf]]] = 0.0
            scores = signs @ turns
            assert scores[leaf] == levels and np.sort(scores)[-2] <= levels - 2


@pytest.mark.parametrize("depth,top", [(0, 0), (3, 3), (6, 2), (8, 5)])
def test_descent_order_walks_every_path_by_adding_2_to_the_k(depth, top):
    """A permutation, unchanged down to level ``top``; from the top block's exit, G += 2^k (1 + right) reaches
    the row of the heap node 2 n + 1 + right at every level, for every path."""
    order = descent_order(depth, top)
    assert sorted(order) == list(range(2 ** (depth + 1) - 1)) and list(order[:2 ** (top + 1) - 1]) == list(range(2 ** (top + 1) - 1))
    row_of = np.argsort(order)
    for start in range(2 ** top - 1, 2 ** (top + 1) - 1):
        rows = [(start, start)]                                      # (row G, heap node n)
        for k in range(top, depth):
            rows = [(g + 2 ** k * (1 + r), 2 * n + 1 + r) for g, n in rows for r in (0, 1)]
        assert all(row_of[n] == g for g, n in rows)


@pytest.mark.parametrize("spec", [make_spec(depth=3), make_spec(depth=0, linear_leaves=True, activation="identity"),
                                  make_spec(form="neuron_tree", depth=4, trees=2, dtype=torch.float16)],
                         ids=["A", "A-linear-depth0", "B-float16"])
def test_checker_and_shape_inference_accept_the_model(spec):
    model = fff_model(spec, lead=("B", "S"))
    onnx.checker.check_model(model, full_check=True)
    del model.graph.output[:]
    model.graph.output.append(helper.make_empty_tensor_value_info("y"))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", "S", spec.d_out]


def test_node_contract_structure():
    spec = make_spec(form="leaf_mlp", depth=4, activation="gelu", tie="gt")
    model = fff_model(spec)
    (node,) = [n for n in model.graph.node if n.domain == DOMAIN]
    assert (node.op_type, node.overload) == ("LeafMLPTree", "d4_gelu_gt_f32")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "depth": 4, "activation": b"gelu", "tie": b"gt"}
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert [initializers[name] for name in node.input[1:]] == [(15, 8), (15,), (16, 8, 4), (16, 4), (16, 4, 5), (16, 5)]
    (function,) = model.functions
    assert (function.domain, function.name, function.overload) == (DOMAIN, "LeafMLPTree", "d4_gelu_gt_f32")
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, DOMAIN: 1}
    assert model.ir_version >= 10
    ops = {n.op_type for n in function.node}
    assert ops <= {"Flatten", "Pad", "Concat", "Unsqueeze", "Slice", "Gemm", "GreaterOrEqual", "Greater", "Where",
                   "MatMul", "ArgMax", "Add", "Mul", "Gather", "ReduceSum", "Div", "Erf", "Shape", "Reshape", "Constant"}
    linear = fff_model(make_spec(depth=2, linear_leaves=True))
    (linear_node,) = [n for n in linear.graph.node if n.domain == DOMAIN]
    assert (linear_node.op_type, len(linear_node.input)) == ("LeafLinearTree", 5)
    assert [f.name for f in linear.functions] == ["LeafLinearTree"]


def test_trt_target_carries_the_plugin_attributes():
    spec = make_spec(form="neuron_tree", depth=3)
    model = fff_model(spec, target="trt")
    (node,) = [n for n in model.graph.node if n.domain == DOMAIN]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["plugin_namespace"] == b"fffcompile" and attributes["plugin_version"] == b"1"
    x = random_input(spec, (5,), seed=3)
    assert_matches_reference(spec, x, run_ort(model, x))
    assert_matches_reference(spec, x, run_reference(model, x))
    back = attach_functions(model, "onnx")
    assert not {"plugin_namespace", "plugin_version"} & {a.name for a in back.graph.node[0].attribute}


def test_a_model_mixing_configurations_gets_one_overload_per_configuration():
    specs_ = [make_spec(depth=2, d_in=6, d_out=6, seed=1), make_spec(depth=4, d_in=6, d_out=6, seed=2),
              make_spec(depth=2, d_in=6, d_out=6, seed=3)]
    graph = helper.make_graph([], "mixed", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 6])],
                              [helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, ["B", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    names = ["x", "y0", "y1", "y2"]
    model = insert_fff_nodes(model, [fff_node(s, names[i], names[i + 1], name=f"fff{i}") for i, s in enumerate(specs_)][::-1])
    assert [n.name for n in model.graph.node] == ["fff0", "fff1", "fff2"]      # re-sorted topologically
    assert sorted(f.overload for f in model.functions) == ["d2_relu_ge_f32", "d4_relu_ge_f32"]
    assert {op: len(c) for op, c in fff_configurations(model).items()} == {"LeafMLPTree": 2}
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(9, 6)
    expected = x
    for spec in specs_:
        expected = reference.hard(spec, expected)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert np.allclose(got, expected.numpy(), atol=1e-5)
    inlined = onnx.inliner.inline_local_functions(model)      # the way to run it where functions are keyed by name
    assert not inlined.functions and DOMAIN not in {n.domain for n in inlined.graph.node}
    assert np.allclose(run_reference(inlined, x).numpy(), expected.numpy(), atol=1e-5)


def test_old_opset_models_are_raised_before_the_rewrite_and_refused_after():
    """A frontend converts an opset-11 original first (raise_opset); a model still below MIN_OPSET is refused."""
    spec = make_spec(depth=3, d_in=4, d_out=4)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 4])])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(InvalidModelError, match="opset 11"):
        insert_fff_nodes(onnx.ModelProto.FromString(old.SerializeToString()), [fff_node(spec, "r", "t")])
    model = raise_opset(old)
    assert {o.domain: o.version for o in model.opset_import}[""] == MIN_OPSET
    del model.graph.node[1:]                      # the rewrite: y now comes from the fffcompile node
    model = insert_fff_nodes(model, [fff_node(spec, "r", "y")])
    x = random_input(spec, (6,), seed=0)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert np.allclose(got, reference.hard(spec, torch.relu(x)).numpy(), atol=1e-5)


def test_node_config_refuses_what_the_contract_does_not_cover():
    with pytest.raises(InvalidModelError, match="activation"):
        NodeConfig("LeafMLPTree", 3, "softplus", "ge", onnx.TensorProto.FLOAT)
    with pytest.raises(InvalidModelError, match="not an fffcompile op"):
        NodeConfig("Tree", 3, "relu", "ge", onnx.TensorProto.FLOAT)
    with pytest.raises(InvalidModelError, match="element type"):
        NodeConfig("NeuronTree", 3, "relu", "ge", onnx.TensorProto.INT32)
