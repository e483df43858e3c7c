"""ONNX translations of ``torch.ops.fffcompile.*`` for torch's dynamo exporter.

``TRANSLATIONS`` goes into ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``:
each fused op becomes one node of the ``contract`` (domain ``fffcompile``), its inputs the
exported tensors (parameters become initializers), with ``depth`` read from the static shape of
node_weight (form A: N = 2^D - 1 rows; form B: n = 2^(D+1) - 1 neurons per tree) and
``activation``/``tie`` from the op's arguments. The overload, the function body and the
plugin attributes are added afterwards by ``attach.attach_functions``.

The exporter's tracer needs an ``onnx.defs.OpSchema`` for every op it records; the schemas here
are handed to the tracer directly and never registered globally, so onnx's checker keeps
treating the nodes as calls of the model-local functions.
"""
from __future__ import annotations

import onnxscript
import torch
from onnx.defs import OpSchema

from .. import ops  # noqa: F401  (registers torch.ops.fffcompile.*)
from .contract import (DOMAIN, DOMAIN_VERSION, LEAF_LINEAR_TREE, LEAF_MLP_INPUTS, LEAF_MLP_TREE, NEURON_TREE,
                       NEURON_TREE_INPUTS)

_FLOATS = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(op_type: str, inputs: tuple[str, ...], optional: tuple[str, ...] = ()) -> OpSchema:
    single = OpSchema.FormalParameterOption.Single
    params = [OpSchema.FormalParameter(name, "T", param_option=OpSchema.FormalParameterOption.Optional
                                       if name in optional else single) for name in inputs]
    attributes = [OpSchema.Attribute("depth", OpSchema.AttrType.INT, "tree depth D"),
                  OpSchema.Attribute("activation", OpSchema.AttrType.STRING, "FFFSpec activation"),
                  OpSchema.Attribute("tie", OpSchema.AttrType.STRING, "'ge' or 'gt'")]
    return OpSchema(op_type, DOMAIN, DOMAIN_VERSION, f"fffcompile {op_type} (see fffcompile.onnx.contract)",
                    inputs=params, outputs=[OpSchema.FormalParameter("Y", "T")],
                    type_constraints=[("T", _FLOATS, "floating point")], attributes=attributes)


_OPSET = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
_LEAF_MLP_TREE = onnxscript.values.Op(_OPSET, LEAF_MLP_TREE, _schema(LEAF_MLP_TREE, LEAF_MLP_INPUTS))
_LEAF_LINEAR_TREE = onnxscript.values.Op(_OPSET, LEAF_LINEAR_TREE, _schema(LEAF_LINEAR_TREE, LEAF_MLP_INPUTS[:5]))
_NEURON_TREE = onnxscript.values.Op(_OPSET, NEURON_TREE, _schema(NEURON_TREE, NEURON_TREE_INPUTS))


def _depth_from(count, what: str, neurons: bool) -> int:
    """D from N = 2^D - 1 (routing nodes) or n = 2^(D+1) - 1 (neurons)."""
    if not isinstance(count, int):
        raise ValueError(f"the fffcompile op's {what} must have a static size to export, got {count!r}")
    return (count + 1).bit_length() - (2 if neurons else 1)


def leaf_mlp_tree(x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2=None, leaf_b2=None,
                  activation: str = "relu", tie: str = "ge"):
    depth = _depth_from(node_weight.shape[0], "node_weight rows", neurons=False)
    if leaf_w2 is None:
        return _LEAF_LINEAR_TREE(x, node_weight, node_bias, leaf_w1, leaf_b1, depth=depth, activation=activation, tie=tie)
    return _LEAF_MLP_TREE(x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, depth=depth,
                          activation=activation, tie=tie)


def neuron_tree(x, node_weight, node_bias, out_weight, out_bias, activation: str = "gelu", tie: str = "gt"):
    depth = _depth_from(node_weight.shape[1], "node_weight neurons", neurons=True)
    return _NEURON_TREE(x, node_weight, node_bias, out_weight, out_bias, depth=depth, activation=activation, tie=tie)


TRANSLATIONS = {
    torch.ops.fffcompile.leaf_mlp_tree.default: leaf_mlp_tree,
    torch.ops.fffcompile.neuron_tree.default: neuron_tree,
}

__all__ = ["TRANSLATIONS", "leaf_mlp_tree", "neuron_tree"]
