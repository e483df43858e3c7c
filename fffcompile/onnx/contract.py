"""The ONNX node contract of a fused FFF: what every ONNX producer and consumer in fffcompile agrees on.

One node per FFF, in domain ``fffcompile`` version 1 (the model imports ``("fffcompile", 1)``):

- ``LeafMLPTree`` (FORMS.md form A; form C's master branch and blend stay ordinary ops around it)
  inputs  X (..., d_in), node_weight (N, d_in), node_bias (N,), leaf_w1 (L, d_in, l), leaf_b1 (L, l),
          leaf_w2 (L, l, d_out), leaf_b2 (L, d_out);
  output  Y (..., d_out);  N = 2^D - 1 routing nodes, L = 2^D leaves, heap order.
- ``LeafLinearTree`` (form A with single-linear leaves, y = act(x W1_j + b1_j))
  inputs  X, node_weight, node_bias, leaf_w1 (L, d_in, d_out), leaf_b1 (L, d_out); output Y (..., d_out).
  Its own op_type because a TensorRT plugin has a fixed number of inputs and the parser binds a
  node to a plugin by op_type alone.
- ``NeuronTree`` (form B)
  inputs  X (..., d_in), node_weight (P, n, d_in), node_bias (P, n), out_weight (P, n, d_out), out_bias (d_out,);
  output  Y (..., d_out);  n = 2^(D+1) - 1 neurons per tree, P trees, tree-major.

The weights are initializers of the main graph fed straight into the node, so that a TensorRT
plugin bound to the node receives them as its inputs. Attributes:

- ``depth`` (int), ``activation`` (string, one of ``FFFSpec`` activations), ``tie`` ("ge": go
  right when z >= 0; "gt": when z > 0);
- with target "trt" also ``plugin_namespace="fffcompile"`` and ``plugin_version="1"``: TensorRT's
  ONNX parser binds the plugin ``fffcompile::<op_type>`` by op_type and
  these attributes, and a registered plugin takes precedence over the model-local function.

Every node carries ``overload`` = ``NodeConfig.overload`` and the model carries a model-local
FunctionProto with the same (domain, name, overload) whose body is the standard-op descent
(``function_body``), so the file runs without any plugin or custom-op library. Bodies differ by
form, depth, tree count, activation, tie rule, linear leaves and dtype (never by widths), hence
one function per configuration, told apart by the IR-v10 ``overload`` field; the model's IR
version is at least 10.

Who resolves overloads (measured with onnx 1.23, onnxruntime 1.32; TensorRT from the
onnx-tensorrt sources): ONNX Runtime, ``onnx.checker``, ``onnx.shape_inference`` and
``onnx.inliner`` resolve (domain, name, overload) exactly. ``onnx.reference.ReferenceEvaluator``
keys local functions by (domain, name) and keeps the last one, and TensorRT's parser keys them by
name and keeps the first: both run the right body when a model holds one configuration per
op_type (the usual case: every layer of a network alike); for a model mixing configurations,
inline first (``onnx.inliner.inline_local_functions``, which honours overloads) or, for
TensorRT, register the plugin. ``attach.fff_configurations`` tells such models apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx
import torch

from ..errors import InvalidModelError
from ..spec import ACTIVATIONS, TIES, FFFSpec

DOMAIN = "fffcompile"
DOMAIN_VERSION = 1
LEAF_MLP_TREE = "LeafMLPTree"
LEAF_LINEAR_TREE = "LeafLinearTree"
NEURON_TREE = "NeuronTree"
OP_TYPES = (LEAF_MLP_TREE, LEAF_LINEAR_TREE, NEURON_TREE)
LEAF_OP_TYPES = (LEAF_MLP_TREE, LEAF_LINEAR_TREE)
TARGETS = ("onnx", "trt")
PLUGIN_NAMESPACE = "fffcompile"
PLUGIN_VERSION = "1"
MIN_IR_VERSION = 10          # FunctionProto.overload / NodeProto.overload
MIN_OPSET = 14               # the body uses axes as inputs (13) and Reshape(allowzero=1) (14)

LEAF_MLP_INPUTS = ("X", "node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2")
NEURON_TREE_INPUTS = ("X", "node_weight", "node_bias", "out_weight", "out_bias")
ATTRIBUTES = ("depth", "activation", "tie", "plugin_namespace", "plugin_version")

_TORCH_TO_ONNX = {torch.float32: onnx.TensorProto.FLOAT, torch.float64: onnx.TensorProto.DOUBLE,
                  torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}
FLOAT_TYPES = tuple(_TORCH_TO_ONNX.values())
_DTYPE_TAG = {onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.DOUBLE: "f64",
              onnx.TensorProto.FLOAT16: "f16", onnx.TensorProto.BFLOAT16: "bf16"}


def onnx_dtype(dtype: torch.dtype) -> int:
    """The ONNX element type of a torch floating dtype the spec allows."""
    return _TORCH_TO_ONNX[dtype]


def torch_dtype(elem_type: int) -> torch.dtype:
    return {v: k for k, v in _TORCH_TO_ONNX.items()}[elem_type]


@dataclass(frozen=True)
class NodeConfig:
    """Everything a function body depends on; two nodes with equal configs share one function."""

    op_type: str            # one of OP_TYPES
    depth: int
    activation: str
    tie: str
    dtype: int              # ONNX element type of X and the weights
    trees: int = 1          # P (NeuronTree only)

    @property
    def linear_leaves(self) -> bool:
        return self.op_type == LEAF_LINEAR_TREE

    def __post_init__(self):
        if self.op_type not in OP_TYPES:
            raise InvalidModelError(f"{self.op_type!r} is not an fffcompile op ({', '.join(OP_TYPES)})")
        if self.activation not in ACTIVATIONS:
            raise InvalidModelError(f"fffcompile node: activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.tie not in TIES:
            raise InvalidModelError(f"fffcompile node: tie {self.tie!r} is not one of {TIES}")
        if self.dtype not in _DTYPE_TAG:
            raise InvalidModelError(f"fffcompile node: element type {onnx.TensorProto.DataType.Name(self.dtype)} "
                                    f"is not supported (float, double, float16, bfloat16)")
        if not 0 <= self.depth <= 24:
            raise InvalidModelError(f"fffcompile node: depth {self.depth} is outside 0..24")

    @property
    def overload(self) -> str:
        """The function overload naming this configuration, e.g. ``d11_p1_gelu_gt_f32``."""
        parts = [f"d{self.depth}"]
        if self.op_type == NEURON_TREE:
            parts.append(f"p{self.trees}")
        parts += [self.activation, self.tie]
        parts.append(_DTYPE_TAG[self.dtype])
        return "_".join(parts)

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.op_type == NEURON_TREE:
            return NEURON_TREE_INPUTS
        return LEAF_MLP_INPUTS[:5] if self.linear_leaves else LEAF_MLP_INPUTS

    @staticmethod
    def from_spec(spec: FFFSpec) -> "NodeConfig":
        """The configuration of ``spec``'s tree part (a master leaf is not part of the node)."""
        if spec.form == "leaf_mlp":
            return NodeConfig(LEAF_LINEAR_TREE if spec.linear_leaves else LEAF_MLP_TREE, spec.depth, spec.activation,
                              spec.tie, onnx_dtype(spec.dtype))
        return NodeConfig(NEURON_TREE, spec.depth, spec.activation, spec.tie, onnx_dtype(spec.dtype),
                          trees=spec.trees)


def node_attributes(config: NodeConfig, target: str) -> dict:
    """The attributes a node of ``config`` carries for ``target`` ("onnx" or "trt")."""
    check_target(target)
    attributes = dict(depth=config.depth, activation=config.activation, tie=config.tie)
    if target == "trt":
        attributes.update(plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
    return attributes


def check_target(target: str) -> None:
    from ..errors import UserError
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def is_fff_node(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type in OP_TYPES


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def config_of_node(node: onnx.NodeProto, weight_dtype: int, trees: Optional[int] = None) -> NodeConfig:
    """Read a node's configuration from its attributes, input count and weights' element type."""
    def text(name):
        value = attribute(node, name)
        return value.decode() if isinstance(value, bytes) else value

    depth, activation, tie = attribute(node, "depth"), text("activation"), text("tie")
    if depth is None or activation is None or tie is None:
        raise InvalidModelError(f"fffcompile node {node.name or node.output[0]!r} lacks one of the attributes "
                                f"depth, activation, tie")
    config = NodeConfig(node.op_type, int(depth), activation, tie, weight_dtype,
                        trees=int(trees or 1) if node.op_type == NEURON_TREE else 1)
    if len(node.input) != len(config.input_names):
        raise InvalidModelError(f"{node.op_type} node {node.name or node.output[0]!r} has {len(node.input)} inputs; "
                                f"the contract has {len(config.input_names)}")
    return config
