"""Test-local builder of an ONNX model holding one fffcompile node, per the ONNX node contract.

This stands in for the exporter (``--target trt``) until it lands, so that the TensorRT-side
checks have a file to read; it is not the exporter. The contract:

- node domain "fffcompile" (opset 1), op_type "LeafMLPTree" (inputs X, node_weight, node_bias,
  leaf_w1, leaf_b1, leaf_w2, leaf_b2), "LeafLinearTree" (linear leaves: the same without leaf_w2,
  leaf_b2; the name proposed in runtime/trt.py, since a TensorRT plugin has a fixed input count)
  or "NeuronTree" (X, node_weight, node_bias, out_weight, out_bias); attributes depth, activation, tie, plugin_namespace="fffcompile", plugin_version="1";
  the weights are initializers fed as inputs;
- a model-local function of the same name and domain whose body is a standard-op gather
  decomposition of the hardened descent (what TensorRT's parser imports when no plugin with
  that name is registered; ONNX Runtime runs it too).

The body here is unrolled for the node's depth. Activations: relu, gelu (erf form), sigmoid,
tanh, identity.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fffcompile.ops import op_arguments
from fffcompile.spec import FFFSpec

DOMAIN = "fffcompile"
OPSET = 18
_ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16}


class _Body:
    """Accumulates the nodes of a function body; each op returns its fresh output name."""

    def __init__(self):
        self.nodes, self._count = [], 0

    def __call__(self, op: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"t{self._count}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        return self("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))


def _activation(b: _Body, name: str, h: str) -> str:
    if name == "relu":
        return b("Relu", h)
    if name == "gelu":
        half = b("CastLike", b.const(0.5, np.float32), h)
        root = b("CastLike", b.const(2 ** -0.5, np.float32), h)
        one = b("CastLike", b.const(1.0, np.float32), h)
        return b("Mul", b("Mul", h, half), b("Add", one, b("Erf", b("Mul", h, root))))
    if name == "sigmoid":
        return b("Sigmoid", h)
    if name == "tanh":
        return b("Tanh", h)
    if name == "identity":
        return b("Identity", h)
    raise ValueError(f"the test-local decomposition has no activation {name!r}")


def _go_right(b: _Body, z: str, tie: str) -> str:
    zero = b("CastLike", b.const(0.0, np.float32), z)
    return b("Cast", b("GreaterOrEqual" if tie == "ge" else "Greater", z, zero), to=TensorProto.INT64)


def _rows(b: _Body) -> tuple[str, str]:
    """(X flattened to (R, d_in), the output shape's leading dims)."""
    d_in = b("Shape", "X", start=-1)
    flat = b("Reshape", "X", b("Concat", b.const([-1]), d_in, axis=0))
    return flat, b("Shape", "X", end=-1)


def _leaf_mlp_body(spec: FFFSpec) -> list:
    b = _Body()
    X, lead = _rows(b)
    node = b("ConstantOfShape", b("Shape", X, end=1), value=numpy_helper.from_array(np.zeros(1, np.int64)))
    for _ in range(spec.depth):
        z = b("Add", b("ReduceSum", b("Mul", X, b("Gather", "node_weight", node, axis=0)), b.const([1]), keepdims=0),
              b("Gather", "node_bias", node, axis=0))
        node = b("Add", b("Add", b("Mul", node, b.const(2)), b.const(1)), _go_right(b, z, spec.tie))
    leaf = b("Sub", node, b.const(2 ** spec.depth - 1))
    h = b("Squeeze", b("MatMul", b("Unsqueeze", X, b.const([1])), b("Gather", "leaf_w1", leaf, axis=0)), b.const([1]))
    h = _activation(b, spec.activation, b("Add", h, b("Gather", "leaf_b1", leaf, axis=0)))
    if spec.leaf_w2 is not None:
        h = b("Squeeze", b("MatMul", b("Unsqueeze", h, b.const([1])), b("Gather", "leaf_w2", leaf, axis=0)), b.const([1]))
        h = b("Add", h, b("Gather", "leaf_b2", leaf, axis=0))
    b.nodes.append(helper.make_node("Reshape", [h, b("Concat", lead, b("Shape", h, start=-1), axis=0)], ["Y"]))
    return b.nodes


def _neuron_tree_body(spec: FFFSpec) -> list:
    b = _Body()
    X, lead = _rows(b)
    per_tree = 2 ** (spec.depth + 1) - 1
    W = b("Reshape", "node_weight", b.const([spec.trees * per_tree, -1]))
    bias = b("Reshape", "node_bias", b.const([-1]))
    V = b("Reshape", "out_weight", b.const([spec.trees * per_tree, -1]))
    offset = b.const(np.arange(spec.trees) * per_tree)
    node = b("Mul", b("ConstantOfShape", b("Concat", b("Shape", X, end=1), b.const([spec.trees]), axis=0),
                      value=numpy_helper.from_array(np.zeros(1, np.int64))), b.const(0))
    y = None
    for _ in range(spec.depth + 1):
        flat = b("Add", node, offset)                                                      # (R, P)
        a = b("ReduceSum", b("Mul", b("Unsqueeze", X, b.const([1])), b("Gather", W, flat, axis=0)), b.const([2]),
              keepdims=0)
        a = b("Add", a, b("Gather", bias, flat, axis=0))
        term = b("ReduceSum", b("Mul", b("Unsqueeze", _activation(b, spec.activation, a), b.const([2])),
                                b("Gather", V, flat, axis=0)), b.const([1]), keepdims=0)
        y = term if y is None else b("Add", y, term)
        node = b("Add", b("Add", b("Mul", node, b.const(2)), b.const(1)), _go_right(b, a, spec.tie))
    y = b("Add", y, "out_bias")
    b.nodes.append(helper.make_node("Reshape", [y, b("Concat", lead, b("Shape", y, start=-1), axis=0)], ["Y"]))
    return b.nodes


def op_type(spec: FFFSpec) -> str:
    if spec.form == "neuron_tree":
        return "NeuronTree"
    return "LeafLinearTree" if spec.linear_leaves else "LeafMLPTree"


def input_names(spec: FFFSpec) -> list[str]:
    if spec.form == "leaf_mlp":
        names = ["X", "node_weight", "node_bias", "leaf_w1", "leaf_b1"]
        return names + (["leaf_w2", "leaf_b2"] if spec.leaf_w2 is not None else [])
    return ["X", "node_weight", "node_bias", "out_weight", "out_bias"]


def fff_model(spec: FFFSpec, lead_dims: tuple = ("batch",)) -> onnx.ModelProto:
    """A model Y = fffcompile node(X) with ``spec``'s weights as initializers and the local function."""
    names = input_names(spec)
    elem = _ONNX_TYPE[spec.dtype]
    attrs = dict(depth=spec.depth, activation=spec.activation, tie=spec.tie, plugin_namespace=DOMAIN, plugin_version="1")
    body = _leaf_mlp_body(spec) if spec.form == "leaf_mlp" else _neuron_tree_body(spec)
    function = helper.make_function(DOMAIN, op_type(spec), names, ["Y"], body,
                                    [helper.make_opsetid("", OPSET)], attributes=list(attrs))
    weights = [t for t in op_arguments(spec) if isinstance(t, torch.Tensor)]
    initializers = [numpy_helper.from_array(_numpy(t), f"{name}_value") for name, t in zip(names[1:], weights)]
    node = helper.make_node(op_type(spec), ["X"] + [i.name for i in initializers], ["Y"], name="fff", domain=DOMAIN,
                            **attrs)
    graph = helper.make_graph([node], "fff", [helper.make_tensor_value_info("X", elem, [*lead_dims, spec.d_in])],
                              [helper.make_tensor_value_info("Y", elem, [*lead_dims, spec.d_out])], initializers)
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise ValueError("the test-local builder writes float32 and float16 models only")
    return t.detach().cpu().numpy()
