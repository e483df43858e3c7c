"""Anchor FFF candidates in a captured graph on a few structural facts, not on op sequences.

A candidate is a set of *decisions* reading one input x:
- soft (form A): ``sigmoid(z)`` or ``log_sigmoid(z)`` where z is affine in x (any mix of
  matmul/linear/einsum with constant weights, bias adds, slices, gathers with constant
  indices, views and casts);
- hard (form B): ``z > c`` or ``z >= c`` with z affine in x.

Its *logit sources* are the tensors the decisions read, looked through pure element moves
(views, slices, gathers with constant indices, negation); their features per row are the node
logits (ordered by width, then graph order: per-level tensors become heap order).

Its *output* is a post-dominator of every decision (every path from a decision to the graph
output passes through it; found in one topological sweep that counts pending edges) that is
laid out by x's rows and also reads a "leaf side" (a value computed from x without any
decision: leaf MLPs, neuron activations). The first few such nodes are offered in order; the
numbers (graph_extract, graph_confirm) decide which one, if any, is the FFF.

Must not fire on: a sigmoid of a constant (form C's blend, gates on parameters), decisions on
something that is not affine in its input, or a gated residual / GLU without a mixture over a
tree: those either produce no candidate or fail extraction or confirmation with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .graph_canonical import HARD_DECISIONS, MOVES, SHAPE_ONLY, SOFT_DECISIONS, GraphFacts, hint_shape, is_float_tensor

_LOOK_THROUGH = (MOVES - {"to", "_to_copy", "type_as", "float", "double", "type", "copy"}) | {"neg"}
_MAX_OUTPUTS = 4


@dataclass
class Candidate:
    x: fx.Node
    kind: str                                  # "soft" or "hard"
    decisions: list[fx.Node]
    sources: list[fx.Node]
    outputs: list[fx.Node] = field(default_factory=list)
    where: str = ""


def _decision_arg(facts: GraphFacts, n: fx.Node):
    name = facts.name[n]
    if name in SOFT_DECISIONS and n.args and isinstance(n.args[0], fx.Node):
        return n.args[0], "soft"
    if name in HARD_DECISIONS and len(n.args) == 2 and isinstance(n.args[0], fx.Node) \
            and isinstance(n.args[1], (int, float)):
        return n.args[0], "hard"
    return None, None


def _source(facts: GraphFacts, z: fx.Node, x: fx.Node) -> fx.Node:
    while facts.name[z] in _LOOK_THROUGH:
        live = [i for i in z.all_input_nodes if facts.depends[i] and facts.name[i] not in SHAPE_ONLY]
        if len(live) != 1 or live[0] is x:
            break
        z = live[0]
    return z


def _where(nodes) -> str:
    paths = []
    for n in nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            paths.append(path.split("."))
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def find_candidates(facts: GraphFacts) -> list[Candidate]:
    groups: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    for n in facts.nodes:
        if not facts.depends.get(n):
            continue
        z, kind = _decision_arg(facts, n)
        if z is None or not facts.depends[z] or is_float_tensor(z) is False:
            continue
        x = facts.affine_source[z]
        if x is None or x is z:
            continue
        groups.setdefault((x, kind), []).append(n)
    candidates = []
    for (x, kind), decisions in groups.items():
        sources = list(dict.fromkeys(_source(facts, d.args[0], x) for d in decisions))
        sources = [s for s in sources if facts.affine_source[s] is x]
        if not sources:
            continue

        def width(s):
            shape = hint_shape(s)
            return shape[-1] if shape else 0
        sources.sort(key=lambda s: (width(s), facts.index[s]))
        cand = Candidate(x, kind, decisions, sources, where=_where(decisions) or x.name)
        cand.outputs = _outputs(facts, cand)
        candidates.append(cand)
    return candidates


def _outputs(facts: GraphFacts, cand: Candidate) -> list[fx.Node]:
    decisions = set(cand.decisions)
    decision_side = facts.value_descendants(decisions)
    upstream = facts.ancestors(decisions)
    leaf_roots = [u for n in facts.value_descendants([cand.x]) if n not in decision_side and n not in upstream
                  for u in [n] if u.op != "output" and is_float_tensor(u) is not False]
    leafy = facts.value_descendants(leaf_roots)
    x_shape = hint_shape(cand.x)
    rows = None
    if x_shape:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
    first = min(facts.index[d] for d in decisions)
    last = max(facts.index[d] for d in decisions)
    reach = set(decisions)
    pending, remaining = 0, len(decisions)
    outputs = []
    for n in facts.nodes[first:]:
        if n not in reach:
            continue
        pending -= sum(1 for i in n.all_input_nodes if i in reach)
        if n in decisions:
            remaining -= 1
        if pending == 0 and remaining == 0 and facts.index[n] > last and n in leafy and n.op != "output":
            shape = hint_shape(n)
            if shape and is_float_tensor(n) and rows and (shape[:-1] == x_shape[:-1] or (len(shape) == 2 and shape[0] == rows)):
                outputs.append(n)
                if len(outputs) >= _MAX_OUTPUTS:
                    break
        users = list(n.users)
        pending += len(users)
        reach.update(users)
    return outputs
