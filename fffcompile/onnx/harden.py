"""Harden named Sigmoid nodes of an ONNX model: p = s(z) becomes the step p = [z >= 0] (or [z > 0]).

FORMS.md: a soft FFF evaluated with every node probability replaced by its step is exactly its
hard descent, so the original model with the sigmoids of each rewritten FFF hardened is the
oracle that the rewritten model must match to float tolerance (exactness). Which Sigmoid nodes
belong to a rewritten FFF is the detection frontend's knowledge: it passes their names. Each
becomes ``Cast(GreaterOrEqual(z, 0))`` (``Greater`` for tie "gt") to z's element type, with the
same output name, so every consumer is untouched. Sigmoids not named (a gate, form C's blend
s(k)) stay as they are. A hardened sigmoid that a Log reads (a log-space mixture) is floored at
the dtype's smallest normal number: log 0 = -inf would turn a path-matrix product (-inf * 0) into
NaN, while exp(log tiny) is 0 to every tolerance.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import InvalidModelError
from ..spec import TIES


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {i.name: i.data_type for i in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a convenience here; unknown types are reported below
        inferred = model
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def harden_sigmoids(model: onnx.ModelProto, sigmoids: Union[Iterable[str], Mapping[str, str]],
                    tie: str = "ge") -> onnx.ModelProto:
    """A copy of ``model`` with the named Sigmoid nodes replaced by steps.

    ``sigmoids``: node names, or a mapping node name -> tie rule ("ge"/"gt") when FFFs differ.
    """
    ties = dict(sigmoids) if isinstance(sigmoids, Mapping) else {name: tie for name in sigmoids}
    for name, rule in ties.items():
        if rule not in TIES:
            raise ValueError(f"tie for {name!r} must be one of {TIES}, got {rule!r}")
    hardened = onnx.ModelProto()
    hardened.CopyFrom(model)
    graph = hardened.graph
    found = {n.name for n in graph.node if n.op_type == "Sigmoid" and n.domain in ("", "ai.onnx")}
    missing = sorted(set(ties) - found)
    if missing:
        raise InvalidModelError(f"cannot harden: no Sigmoid node named {missing[:5]} in the main graph")
    types = _element_types(model) if ties else {}
    log_inputs = {n.input[0] for n in graph.node if n.op_type == "Log" and n.input}
    nodes = []
    for node in graph.node:
        if node.name not in ties or node.op_type != "Sigmoid":
            nodes.append(node)
            continue
        z, out = node.input[0], node.output[0]
        elem_type = types.get(z) or types.get(out)
        if not elem_type:
            raise InvalidModelError(f"cannot harden Sigmoid {node.name!r}: the element type of {z!r} is unknown")
        np_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        zero = numpy_helper.from_array(np.zeros((), np_type), f"{node.name}.zero")
        logged = out in log_inputs
        nodes += [
            helper.make_node("Constant", [], [f"{node.name}.zero"], value=zero, name=f"{node.name}.hardened_zero"),
            helper.make_node("GreaterOrEqual" if ties[node.name] == "ge" else "Greater", [z, f"{node.name}.zero"],
                             [f"{node.name}.step"], name=f"{node.name}.hardened_compare"),
            helper.make_node("Cast", [f"{node.name}.step"], [f"{node.name}.cast" if logged else out], to=elem_type,
                             name=node.name),
        ]
        if logged:      # log [z >= 0] would be -inf, and -inf * 0 in a path-matrix product NaN: floor at tiny
            tiny = numpy_helper.from_array(np.array(np.finfo(np_type).tiny, np_type), f"{node.name}.tiny")
            nodes += [helper.make_node("Constant", [], [f"{node.name}.tiny"], value=tiny, name=f"{node.name}.hardened_tiny"),
                      helper.make_node("Max", [f"{node.name}.cast", f"{node.name}.tiny"], [out],
                                       name=f"{node.name}.hardened_floor")]
    del graph.node[:]
    graph.node.extend(nodes)
    return hardened
