"""A float32 twin of a 16-bit ONNX model, for reading FFF weights by numbers.

The extractors read weights back from probe rows (W = f(e_k) - f(0)) and confirm to float32
tolerances; in float16 every probe value is rounded to 11 bits and neither holds. The twin has
the same nodes in the same order (so node indices, value names and regions carry over to the
original) with every float16 / bfloat16 tensor made float32: initializers, ``Constant`` and
``ConstantOfShape`` values, ``Cast`` targets and the declared types of inputs, outputs and
value_info. Every 16-bit weight is exactly a float32 value, so a weight read from the twin is
the model's own weight; the spec is then cast back to the model's dtype (exact) and the node
computes in float32 as ``reference.compute_dtype`` does.

It is not used when the model has no 16-bit tensor. Ops the twin cannot widen (a 16-bit value
inside a function or subgraph) leave the twin inconsistent, and it then fails to load or run
in ONNX Runtime: the candidate is refused with that reason, never rewritten on a guess.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

NARROW = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _wide(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor).astype(np.float32)
    out = numpy_helper.from_array(array, tensor.name)
    return out


def has_narrow_floats(model: onnx.ModelProto) -> bool:
    graph = model.graph
    values = (*graph.input, *graph.output, *graph.value_info)
    return (any(t.data_type in NARROW for t in graph.initializer)
            or any(v.type.tensor_type.elem_type in NARROW for v in values))


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its 16-bit float tensors, constants, casts and types made float32."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    graph = twin.graph
    for k, tensor in enumerate(graph.initializer):
        if tensor.data_type in NARROW:
            graph.initializer[k].CopyFrom(_wide(tensor))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in NARROW:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in NARROW:
                attr.t.CopyFrom(_wide(attr.t))
            elif node.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                                  "RandomUniformLike") and attr.name in ("to", "dtype") and attr.i in NARROW:
                attr.i = TensorProto.FLOAT
    return twin
