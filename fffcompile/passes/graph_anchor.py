"""Anchor FFF candidates in a captured graph on a few structural facts, not on op sequences.

A candidate is a set of *decisions* reading one input x:
- soft (form A): ``sigmoid(z)`` or ``log_sigmoid(z)`` where z is affine in x (any mix of
  matmul/linear/einsum with constant weights, bias adds, slices, gathers with constant
  indices, views and casts);
- hard (form B, or form A already descending): ``z > c`` or ``z >= c`` with z affine in x, or
  with z reading x and earlier decisions only (per-level ``index_select``/``gather`` of node
  weights or logits by the index recurrence 2n + 1 + [z > 0]).

Its *logit sources* are the tensors the decisions read, looked through pure element moves
(views, slices, gathers with constant indices, negation); their features per row are the node
logits (ordered by width, then graph order: per-level tensors become heap order).

Its *output* is a post-dominator of every decision (every path from a decision to the graph
output passes through it; found in one topological sweep that counts pending edges) that is
laid out by x's rows and also reads a "leaf side" (a value computed from x without any
decision: leaf MLPs, neuron activations). The first few such nodes are offered in order; the
numbers (graph_extract, graph_confirm) decide which one, if any, is the FFF.

A sigmoid can also be a leaf MLP's activation (affine in x too). A plain sigmoid whose value,
through element moves, is contracted with a constant weight (matmul/linear/einsum/bmm against
parameters: a leaf's second layer) is proposed as a leaf activation: when a group of sigmoids
on one x holds such ones and others, the others are the candidate's decisions (the first
reading) and the whole group is kept as a ``fallback`` candidate, tried only when no first
reading of that x is confirmed (a node sigmoid contracted with a constant 0/1 path selector).

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
_CONTRACTIONS = {"matmul", "mm", "bmm", "linear", "einsum", "addmm", "baddbmm"}
_PLAIN_SIGMOIDS = {"sigmoid", "expit", "special_expit"}


@dataclass
class Candidate:
    x: fx.Node
    kind: str                                  # "soft" or "hard"
    decisions: list[fx.Node]
    sources: list[fx.Node]
    outputs: list[fx.Node] = field(default_factory=list)
    where: str = ""
    fallback: bool = False                     # tried only when no first reading of the same x is confirmed


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
    return ".".join(common) or "(the model itself)"   # the module frontend's name for the root


def _live(facts: GraphFacts, n: fx.Node) -> list[fx.Node]:
    return [i for i in n.all_input_nodes if facts.depends.get(i) and facts.name[i] not in SHAPE_ONLY]


def _reads_index(facts: GraphFacts, n: fx.Node, steps: int = 4, decided=None) -> bool:
    """An integer/bool tensor among n's inputs within a few float steps (an index gathered into data);
    with ``decided``, only an index among those nodes (one computed from decisions: not token ids)."""
    frontier = [n]
    for _ in range(steps):
        nxt = []
        for m in frontier:
            for i in _live(facts, m):
                if is_float_tensor(i) is False and (decided is None or i in decided):
                    return True
                nxt.append(i)
        frontier = nxt
    return False


def _data_input(facts: GraphFacts, z: fx.Node, decided=None) -> "fx.Node | None":
    """For a hard decision whose logit also reads earlier decisions (z = x . W[n] with n from the
    index recurrence): the one input x its float data comes from, past the index-dependent part
    (``decided``: the values computed from decisions; an embedding of the model's token ids is data)."""
    found, seen, stack = set(), set(), [z]
    while stack:
        n = stack.pop()
        if n in seen or is_float_tensor(n) is False:
            continue
        seen.add(n)
        root = facts.affine_source.get(n)
        if root is None:
            continue
        if root is not n:
            stack.append(root)
            continue
        live = _live(facts, n)
        if n.op != "placeholder" and live and (len(live) > 1 or any(is_float_tensor(i) is False for i in live)) \
                and _reads_index(facts, n, decided=decided):
            stack.extend(live)
        else:
            found.add(n)
    return found.pop() if len(found) == 1 else None


def _leaf_activation(facts: GraphFacts, d: fx.Node, steps: int = 6) -> bool:
    """A plain sigmoid whose value, through element moves, is contracted with constants only
    (a leaf MLP's second layer): a leaf activation rather than a node decision."""
    if facts.name[d] not in _PLAIN_SIGMOIDS:
        return False
    frontier, seen = [d], {d}
    for _ in range(steps):
        nxt = []
        for n in frontier:
            for u in n.users:
                name = facts.name[u]
                if name in _CONTRACTIONS:
                    others = [i for i in u.all_input_nodes if i is not n]
                    if (others or u.op == "call_module") and not any(facts.depends.get(i) for i in others):
                        return True
                elif name in MOVES and u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return False


def find_candidates(facts: GraphFacts) -> list[Candidate]:
    groups: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    hard = []
    found = []
    for n in facts.nodes:
        if not facts.depends.get(n):
            continue
        z, kind = _decision_arg(facts, n)
        if z is None or not facts.depends[z] or is_float_tensor(z) is False:
            continue
        found.append((n, z, kind))
    # a logit that reads earlier decisions (node weights gathered by the index recurrence), even
    # through a squeeze, is traced back to its data input rather than taken as an input itself
    after = facts.value_descendants([n for n, _, kind in found if kind == "hard"])
    for n, z, kind in found:
        x = facts.affine_source[z]
        if x is None or x is z or (kind == "hard" and x in after):
            if kind == "hard":
                hard.append(n)
            continue
        groups.setdefault((x, kind), []).append(n)
    if hard:
        for n in hard:
            x = _data_input(facts, n.args[0], after)
            if x is not None and x is not n.args[0]:
                groups.setdefault((x, "hard"), []).append(n)
    candidates = []
    split = []
    for (x, kind), decisions in groups.items():
        readings = [(decisions, False)]
        if kind == "soft":
            nodes = [d for d in decisions if not _leaf_activation(facts, d)]
            if 0 < len(nodes) < len(decisions):      # some sigmoids look like leaf activations
                readings = [(nodes, False), (decisions, True)]
        for chosen, fallback in readings:
            parts = _trees(facts, x, chosen) if kind == "soft" and len(chosen) > 1 else [chosen]
            split += [((x, kind), part, fallback) for part in parts]
    for (x, kind), decisions, fallback in split:
        sources = list(dict.fromkeys(_source(facts, d.args[0], x) for d in decisions))
        sources = [s for s in sources if facts.affine_source[s] is x]
        if not sources and kind == "soft":
            continue
        decisions.sort(key=facts.index.__getitem__)

        def width(s):
            shape = hint_shape(s)
            return shape[-1] if shape else 0
        sources.sort(key=lambda s: (width(s), facts.index[s]))
        cand = Candidate(x, kind, decisions, sources, where=_where(decisions) or x.name, fallback=fallback)
        cand.outputs = _outputs(facts, cand)
        candidates.append(cand)
    return candidates


def _trees(facts: GraphFacts, x: fx.Node, decisions: list) -> list[list]:
    """Soft decisions on one input split into the trees they form: two decisions belong to one
    tree when some value computed from decisions alone (a mixture, a path product, before any
    leaf value is mixed in) reads both. Two FFFs reading the same x become two candidates."""
    chosen = set(decisions)
    side = facts.value_descendants(chosen)
    upstream = facts.ancestors(chosen)
    roots = [n for n in facts.value_descendants([x]) if n not in side and n not in upstream and n.op != "output"]
    leafy = facts.value_descendants(roots)
    parent = {d: d for d in decisions}

    def find(d):
        while parent[d] is not d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    label = {}
    for n in facts.nodes:
        if n in chosen:
            label[n] = n
        elif n in side and n not in leafy:
            found = [find(label[i]) for i in n.all_input_nodes if i in label]
            if found:
                for other in found[1:]:
                    parent[find(other)] = find(found[0])
                label[n] = found[0]
    parts: dict = {}
    for d in decisions:
        parts.setdefault(find(d), []).append(d)
    return list(parts.values())


def _outputs(facts: GraphFacts, cand: Candidate) -> list[fx.Node]:
    decisions = set(cand.decisions)
    decision_side = facts.value_descendants(decisions)
    upstream = facts.ancestors(decisions)
    leaf_roots = [u for n in facts.value_descendants([cand.x]) if n not in decision_side and n not in upstream
                  for u in [n] if u.op != "output" and is_float_tensor(u) is not False]
    # a hard tree may compute its leaves only for the chosen leaf (weights gathered by the leaf index)
    leafy = facts.value_descendants(leaf_roots) if cand.kind == "soft" else facts.value_descendants([cand.x])
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
