"""Which tensors of an ONNX graph are affine projections of one input X, found by structure.

A tensor is *linear in X* when it is X itself, or the output of a projection (MatMul, Gemm or
Einsum with one input linear in X and the others constant), of a bias Add/Sub (a linear input
plus a constant, or two linear inputs), or of a layout op (Reshape, Flatten, Squeeze,
Unsqueeze, Transpose, Identity, Slice, Split, Concat, Gather/GatherND with constant indices,
Expand) of linear inputs. Shape arithmetic (anything computed from ``Shape``/``Size`` and
constants) counts as static and may feed any of these. A linear tensor downstream of a
projection is *projected*: ``z = x W + b`` of a router, ``a = x W1 + b1`` of a leaf, either
exporter's way of writing it (per-level slices of a folded weight, one Einsum over all leaves,
one Gemm per router node).

Scaling by a constant (Mul, Div) is deliberately not part of a chain: an activation written as
ops (GELU as ``0.5 a (1 + erf(a / sqrt 2))``) starts with such a scaling, and the chain must
stop at its input ``a``. Only at the top of a router, where a sigmoid reads it, is a scaling by a constant
scalar read through (``unscaled``: s(z / T), a router temperature; ``detect.router_source``).

``trace_source(index, name)``: the X a projected tensor comes from (None when it does not come
from exactly one X through a chain). ``projected_tensors(index, x, node_ids)``: the projected
tensors among the nodes given, and ``chain_ends``: those read by something other than a chain
op (the pre-activations and router logits). Nothing here evaluates numbers; the affinity is
checked numerically by extraction.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from .graph_index import SHAPE_OPS, GraphIndex

PROJECTIONS = ("MatMul", "Gemm", "Einsum")
BIAS_OPS = ("Add", "Sub")
LAYOUT_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Split", "Concat",
              "Gather", "GatherND", "GatherElements", "Expand")
CHAIN_OPS = PROJECTIONS + BIAS_OPS + LAYOUT_OPS


def static_tensors(index: GraphIndex) -> set[str]:
    """Constants and shape arithmetic: tensors whose values do not depend on any input's values."""
    cached = getattr(index, "_static", None)
    if cached is not None:
        return cached
    static = set(index.constant)
    for k, node in enumerate(index.nodes):
        ins = [i for i in index.inputs_of[k] if i]
        if node.op_type in SHAPE_OPS or all(i in static for i in ins):
            static.update(o for o in node.output if o)
    index._static = static
    return static


def _data_inputs(node, static: set[str]) -> list[str]:
    """The non-static inputs of a chain node (indices and shapes excluded)."""
    if node.op_type in ("Gather", "GatherND", "GatherElements", "Slice", "Reshape", "Expand", "Squeeze",
                        "Unsqueeze", "Split"):
        ins = [node.input[0]]
        if any(i and i not in static for i in node.input[1:]):
            return []      # data-dependent indices or shapes: not a layout op
        return ins
    return [i for i in node.input if i and i not in static]


def trace_source(index: GraphIndex, name: str, static: set[str], limit: int = 64) -> Optional[str]:
    """The single X that ``name`` is a projection of, following chain ops backwards."""
    sources: set[str] = set()
    frontier, seen, projected = [name], set(), False
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        if len(seen) > limit * 64:
            return None
        node = index.producer_node(t)
        if node is None or node.op_type not in CHAIN_OPS:
            return None
        data = _data_inputs(node, static)
        if not data:
            return None
        if node.op_type in PROJECTIONS:
            if len(data) != 1:
                return None
            sources.add(data[0])
            projected = True
            continue
        frontier.extend(data)
    if not projected or len(sources) != 1:
        return None
    return sources.pop()


def projected_tensors(index: GraphIndex, x: str, node_ids: Iterable[int], static: set[str]) -> set[str]:
    """Tensors among the outputs of ``node_ids`` (graph order) that are projections of x."""
    linear, projected = {x}, set()
    for i in sorted(node_ids):
        node = index.nodes[i]
        if node.op_type not in CHAIN_OPS:
            continue
        data = _data_inputs(node, static)
        if not data or not all(d in linear for d in data):
            continue
        if node.op_type in PROJECTIONS and len(data) != 1:
            continue
        outs = [o for o in node.output if o]
        linear.update(outs)
        if node.op_type in PROJECTIONS or any(d in projected for d in data):
            projected.update(outs)
    return projected


def chain_ends(index: GraphIndex, projected: set[str], node_ids: set[int]) -> list[str]:
    """Projected tensors read (inside ``node_ids``) by at least one op that does not continue the chain."""
    ends = []
    for t in projected:
        for i in index.consumers.get(t, ()):
            if i not in node_ids:
                continue
            node = index.nodes[i]
            if node.op_type in SHAPE_OPS:
                continue
            if not all(o in projected for o in node.output if o):
                ends.append(t)
                break
    return sorted(ends, key=lambda t: index.producer.get(t, -1))


def unscaled(index: GraphIndex, z: str, static: set[str]) -> Optional[str]:
    """t when ``z`` is t * c, c * t or t / c for a constant scalar c != 0 (a router temperature s(z / T)), else None."""
    node = index.producer_node(z)
    if node is None or node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    positions = (0,) if node.op_type == "Div" else (0, 1)
    for k in positions:
        t, c = node.input[k], node.input[1 - k]
        value = index.constant_value(c) if t not in static else None
        if value is not None and value.size == 1 and float(np.asarray(value, dtype=np.float64).reshape(-1)[0]) != 0.0:
            return t
    return None
