"""Anchors of FFF candidates in an ONNX graph: the tree's decisions, grouped by the input they route.

- Form A / C, soft: ``Sigmoid`` nodes whose input is a projection of some tensor X (a router
  logit ``z = x W + b``, written per node, per level or for all nodes at once). All such
  sigmoids of one X form one candidate; they are ordered by column count, then graph order,
  which is heap order for every layout the exporters produce (one tensor of all nodes, one per
  level, one per node). A different order is not guessed at: confirmation rejects it.
- Form B (UltraFastBERT-style neuron trees): a comparison of a projection ``a = x W + b`` with
  the constant 0 (``Greater(a, 0)``, ``GreaterOrEqual(a, 0)``, or ``Less``/``LessOrEqual`` with
  the operands swapped) whose ``a`` also feeds other ops (the activation); one candidate each.

Sigmoids of constants (form C's blend ``s(k)``) and sigmoids whose input is also read by other
ops (an activation such as SiLU, ``a * s(a)``) are no anchors. Nothing is rewritten on the
strength of an anchor: ``region`` finds the subgraph, ``extract`` the spec, ``confirm`` the
numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .contract import is_fff_node
from .graph_index import GraphIndex
from .linear_chains import static_tensors, trace_source

COMPARISONS = {"Greater": ("gt", 1), "GreaterOrEqual": ("ge", 1), "Less": ("gt", 0), "LessOrEqual": ("ge", 0)}


@dataclass
class Candidate:
    form: str                      # "A" (soft leaf tree, maybe with a master leaf) or "B" (neuron tree)
    x: str                         # the tensor the tree routes
    anchors: list[int]             # node indices: sigmoids (A) or one comparison (B)
    tie: str = "ge"
    notes: list[str] = field(default_factory=list)

    def where(self, index: GraphIndex) -> str:
        node = index.nodes[self.anchors[0]]
        return f"FFF on {self.x!r} (anchor {node.op_type} {node.name or node.output[0]!r})"


def _is_zero(index: GraphIndex, name: str) -> bool:
    value = index.constant_value(name)
    return value is not None and value.size == 1 and float(np.asarray(value).reshape(-1)[0]) == 0.0


def find_candidates(index: GraphIndex) -> list[Candidate]:
    static = static_tensors(index)
    sigmoid_groups: dict[str, list[int]] = {}
    candidates: list[Candidate] = []
    for i, node in enumerate(index.nodes):
        if is_fff_node(node) or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Sigmoid":
            if node.input[0] in static:
                continue
            readers = index.consumer_nodes(node.input[0])
            if any(r.op_type not in ("Sigmoid", "Shape", "Size") for r in readers):
                continue      # an activation such as SiLU, a * s(a): the logit is read by more than sigmoids
            x = trace_source(index, node.input[0], static)
            if x is not None:
                sigmoid_groups.setdefault(x, []).append(i)
        elif node.op_type in COMPARISONS:
            tie, data_position = COMPARISONS[node.op_type]
            # Greater(a, 0): a is input 0 and 0 is input 1; Less(0, a): the other way round
            a, zero = (node.input[0], node.input[1]) if data_position == 1 else (node.input[1], node.input[0])
            if a in static or not _is_zero(index, zero):
                continue
            if len(index.consumers.get(a, ())) < 2:
                continue          # a decision on a logit nothing else reads is no neuron tree
            x = trace_source(index, a, static)
            if x is not None:
                candidates.append(Candidate("B", x, [i], tie=tie))
    for x, sigmoids in sigmoid_groups.items():
        candidates.append(Candidate("A", x, sigmoids))
    candidates.sort(key=lambda c: c.anchors[0])
    return candidates
