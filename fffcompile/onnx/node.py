"""``fff_node(spec, ...)``: the fffcompile ONNX node of an FFFSpec's tree, with its initializers and function.

This is what a rewrite emits (see ``contract`` for the node contract): one ``LeafMLPTree`` or
``NeuronTree`` node whose inputs are X and the spec's tree weights as initializers, in the
spec's dtype. A form C spec's master leaf and blend are not part of the node: the caller keeps
them as ordinary ops around it (y = s(k) node(x) + (1 - s(k)) master(x)).

    fff = fff_node(spec, "x", "y", target="onnx", name="layer3.fff")
    insert_fff_nodes(model, [fff])          # attach.py: nodes, initializers, functions, imports
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx
import torch
from onnx import helper, numpy_helper

from .contract import DOMAIN, NodeConfig, node_attributes
from .function_body import build_function

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class FFFNode:
    node: onnx.NodeProto
    initializers: tuple[onnx.TensorProto, ...]
    config: NodeConfig
    function: onnx.FunctionProto          # built for ``opset``; insert_fff_nodes rebuilds it for the model's opset
    opset: int


def tensor_proto(tensor: torch.Tensor, name: str) -> onnx.TensorProto:
    """A TensorProto of any spec dtype (bfloat16 included, which numpy cannot hold)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        proto = onnx.TensorProto(name=name, data_type=onnx.TensorProto.BFLOAT16, dims=list(tensor.shape))
        proto.raw_data = tensor.view(torch.int16).numpy().tobytes()
        return proto
    return numpy_helper.from_array(tensor.numpy(), name)


def fff_node(spec, x_name: str, y_name: str, *, target: str = "onnx", name: Optional[str] = None,
             opset: int = DEFAULT_OPSET) -> FFFNode:
    """The node computing ``spec``'s tree on ``x_name`` into ``y_name``; initializers are named ``{name}.{input}``.

    ``name`` (default ``fff_{y_name}``) must be unique in the model the node goes into.
    """
    config = NodeConfig.from_spec(spec)
    name = name or f"fff_{y_name}"
    if spec.form == "leaf_mlp":
        weights = dict(node_weight=spec.node_weight, node_bias=spec.node_bias, leaf_w1=spec.leaf_w1,
                       leaf_b1=spec.leaf_b1)
        if not spec.linear_leaves:
            weights.update(leaf_w2=spec.leaf_w2, leaf_b2=spec.leaf_b2)
    else:
        weights = dict(node_weight=spec.node_weight, node_bias=spec.node_bias, out_weight=spec.out_weight,
                       out_bias=spec.out_bias)
    initializers = tuple(tensor_proto(t, f"{name}.{key}") for key, t in weights.items())
    node = helper.make_node(config.op_type, [x_name, *(i.name for i in initializers)], [y_name], name=name,
                            domain=DOMAIN, overload=config.overload, **node_attributes(config, target))
    return FFFNode(node, initializers, config, build_function(config, opset), opset)

