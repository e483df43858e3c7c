"""Anchors of FFF candidates in an ONNX graph: the tree's decisions, grouped by the input they route.

- Form A / C, soft: ``Sigmoid`` nodes whose input is a projection of some tensor X (a router
  logit ``z = x W + b``, written per node, per level or for all nodes at once, maybe times or over a
  constant scalar: a router temperature s(z / T), read as the logit z / T). All such
  sigmoids of one X form one candidate; they are ordered by column count, then graph order,
  which is heap order for every layout the exporters produce (one tensor of all nodes, one per
  level, one per node). A different order is not guessed at: confirmation rejects it.
- Form A, signed paths: ``Sigmoid(z[..., nodes] * S)``, the router logits gathered by a constant path table and
  multiplied by a constant S of +-1 (``signed_router``); the candidate keeps the logit z for extraction.
- Form B (UltraFastBERT-style neuron trees): a comparison of a projection ``a = x W + b`` with
  the constant 0 (``Greater(a, 0)``, ``GreaterOrEqual(a, 0)``, or ``Less``/``LessOrEqual`` with
  the operands swapped) whose ``a`` also feeds other ops (the activation); one candidate each.

- Hard trees that gather the current node's weight row (``gathered_dot``: z = X . Gather(W, n), per
  level): all such comparisons of one X and tie rule form one candidate ("G"), when at least one
  gathers by a data-dependent index (``extract_gathered_tree``; forms A and B).
- Form A, hard (a descent written with gathers): comparisons with 0 of a logit *picked* by a
  data-dependent Gather/GatherElements/GatherND from a projection of X (every node's logit);
  all such comparisons of one X form one candidate ("H"). At depth 1 the one node's logit is a plain
  projection (its row gathered by a constant index): a comparison of it whose decision indexes a
  constant table of 2 rows (the leaves) is an "H" anchor too (``_picks_leaf``).

Two soft trees routing the same X land in one sigmoid group; when that group is not confirmed,
``split_by_outputs`` splits it where its sigmoids meet last downstream (the sum or product of the
trees' outputs), or into the sets that never meet, and each part is tried on its own.

Sigmoids of constants (form C's blend ``s(k)``) and sigmoids whose output is read together with
their input by one op (an activation such as SiLU, ``a * s(a)``) are no anchors.

A sigmoid can also be a leaf MLP's activation (a projection of X too). A sigmoid whose value, through
layout ops, is only contracted with constants (MatMul / Gemm / Einsum against static tensors: a leaf's
second layer) is a *leaf activation* candidate (``leaf_activation``): when a sigmoid group of one X holds
such ones and others, the others are the anchors of a first candidate (``leaf_sigmoids`` holds the
rest, which stay soft when hardened), and the whole group follows as a ``fallback`` candidate, tried
only when the first reading is not confirmed (a router sigmoid contracted with a constant 0/1 path
matrix). A sigmoid that meets a data value first (a gate ``x * s(x W)``, a GLU) stays a router. Nothing is rewritten on the
strength of an anchor: ``region`` finds the subgraph, ``extract`` the spec, ``confirm`` the
numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .contract import FLOAT_TYPES, is_fff_node
from .graph_index import GraphIndex
from .linear_chains import static_tensors, trace_source, unscaled

COMPARISONS = {"Greater": ("gt", 1), "GreaterOrEqual": ("ge", 1), "Less": ("gt", 0), "LessOrEqual": ("ge", 0)}


@dataclass
class Candidate:
    form: str                      # "A" (soft leaf tree, maybe with a master leaf), "H" (hard leaf tree), "B" (neuron
                                   # tree), "G" (hard tree gathering its node rows)
    x: str                         # the tensor the tree routes
    anchors: list[int]             # node indices: sigmoids (A) or one comparison (B)
    tie: str = "ge"
    notes: list[str] = field(default_factory=list)
    logits: dict[int, str] = field(default_factory=dict)   # signed-path sigmoid -> the router logit it gathers
    leaf_sigmoids: list[int] = field(default_factory=list)  # sigmoids of X read as the leaves' activation, not anchors
    fallback: bool = False         # the all-decisions reading of a group with leaf sigmoids: tried after the first

    def where(self, index: GraphIndex) -> str:
        node = index.nodes[self.anchors[0]]
        return f"FFF on {self.x!r} (anchor {node.op_type} {node.name or node.output[0]!r})"


def _is_zero(index: GraphIndex, name: str) -> bool:
    value = index.constant_value(name)
    return value is not None and value.size == 1 and float(np.asarray(value).reshape(-1)[0]) == 0.0


def _read_elsewhere(index: GraphIndex, a: str) -> bool:
    """Whether logit ``a`` (or the tensor it is a reshaped view or a cast of: trees viewed as (B, P, n), a float16
    layer deciding in float32) has other readers."""
    for _ in range(4):
        if len(index.consumers.get(a, ())) >= 2:
            return True
        node = index.producer_node(a)
        if node is None or node.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"):
            return False
        a = node.input[0]
    return False


def router_source(index: GraphIndex, i: int, static: set[str]) -> Optional[str]:
    """The X that Sigmoid node ``i`` routes (its input is a projection of X, maybe scaled by a constant scalar:
    s(z / T) decides as z / T > 0, and the scaled logit is still affine in X), or None: a sigmoid of a constant
    (form C's blend) or an activation such as SiLU or QuickGELU (one op reads both the logit, scaled or not,
    and its sigmoid: a s(a), a s(1.702 a))."""
    node = index.nodes[i]
    if node.op_type != "Sigmoid" or node.input[0] in static:
        return None
    logit = node.input[0]
    plain = unscaled(index, logit, static)
    for t in (logit, plain):
        if t is not None and any(node.output[0] in r.input for r in index.consumer_nodes(t)):
            return None
    return trace_source(index, plain or logit, static)


_LAYOUT = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Expand", "Cast")
_CONTRACTIONS = ("MatMul", "Gemm", "Einsum")


def leaf_activation(index: GraphIndex, i: int, static: set[str], steps: int = 6) -> bool:
    """Whether Sigmoid node ``i``'s value, through layout ops, is read only by contractions (MatMul / Gemm /
    Einsum) with static tensors: a leaf MLP's activation before its second layer, rather than a router.
    Any other reader (a product with data, a Sub 1 - p, a Slice) makes it router-like."""
    frontier, seen, contracted = [index.nodes[i].output[0]], set(), False
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        if len(seen) > steps * 4:
            return False
        for c in index.consumers.get(t, ()):
            node = index.nodes[c]
            others = [n for n in node.input if n and n != t]
            if node.op_type in _LAYOUT and node.input[0] == t:
                frontier.extend(o for o in node.output if o)
            elif node.op_type in _CONTRACTIONS and others and all(n in static for n in others):
                contracted = True
            elif node.op_type not in ("Shape", "Size"):
                return False
    return contracted


def scaled_routers(index: GraphIndex) -> list[tuple[int, str]]:
    """(Sigmoid node, X) for sigmoids of a projection of X multiplied by a constant tensor (z * T: signed path
    tables, a log-space mixture s(+-z)): router-like; reported, not rewritten, unless ``signed_router`` reads one
    as an anchor (``find_ffs`` skips those)."""
    static = static_tensors(index)
    out = []
    for i, node in enumerate(index.nodes):
        if node.op_type != "Sigmoid" or is_fff_node(node) or router_source(index, i, static) is not None:
            continue
        scaled = index.producer_node(node.input[0])
        if scaled is None or scaled.op_type not in ("Mul", "Div") or len(scaled.input) != 2:
            continue
        data = [t for t in scaled.input if t not in static]
        if len(data) != 1 or len(data) == len(scaled.input):
            continue
        x = trace_source(index, data[0], static)
        if x is not None:
            out.append((i, x))
    return out


def signed_router(index: GraphIndex, i: int, static: set[str]) -> Optional[tuple[str, str]]:
    """(X, z) when Sigmoid node ``i`` reads z[..., nodes] * S: router logits z = x W + b of X gathered by a constant
    path table and multiplied by a constant S of +-1 (s(z) where a path goes right, s(-z) = 1 - s(z) where it goes
    left: mu_j = prod_k s(S_jk z_{n_jk})); None otherwise. Only a reading: ``confirm`` decides."""
    node = index.nodes[i]
    scaled = index.producer_node(node.input[0])
    if scaled is None or scaled.op_type != "Mul" or len(scaled.input) != 2:
        return None
    signs = [t for t in scaled.input if t in static]
    data = [t for t in scaled.input if t not in static]
    if len(signs) != 1 or len(data) != 1:
        return None
    value = index.constant_value(signs[0])
    if value is None or value.size < 2 or not np.all(np.abs(np.asarray(value, dtype=np.float64)) == 1.0):
        return None
    z, gathered = data[0], False        # back through layout ops and gathers by a constant path table
    for _ in range(8):
        producer = index.producer_node(z)
        if producer is None or producer.op_type not in _VIEWS + ("GatherND",) \
                or any(t and t not in static for t in producer.input[1:]):
            break
        gathered |= producer.op_type in ("Gather", "GatherND")
        z = producer.input[0]
    x = trace_source(index, z, static) if gathered else None
    return (x, z) if x is not None else None


# layout ops, also Gather/Slice when their indices are constant (``x[:, 0, 0]``)
_VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Expand", "Gather", "Slice")
_GATHERS = ("Gather", "GatherElements", "GatherND")


def _through_views(index: GraphIndex, name: str, static: set[str]) -> str:
    """The tensor ``name`` is a reshaped / transposed view of (following single-data-input layout ops back)."""
    for _ in range(8):
        node = index.producer_node(name)
        if node is None or node.op_type not in _VIEWS or any(t and t not in static for t in node.input[1:]):
            return name
        name = node.input[0]
    return name


def gathered_dot(index: GraphIndex, a: str, static: set[str]) -> Optional[tuple[str, bool]]:
    """(X, dynamic) when logit ``a`` is a dot product of X with a row gathered from a constant table (a hard
    descent that gathers the current node's weights; ``dynamic``: gathered by a data-dependent index), plus
    layout ops, a gathered bias and a ReduceSum; None otherwise."""
    frontier, seen = [a], 0
    while frontier and seen < 12:
        node = index.producer_node(frontier.pop())
        seen += 1
        if node is None:
            continue
        if node.op_type == "Add" or node.op_type in _VIEWS + ("ReduceSum", "Cast") \
                and all(t in static for t in node.input[1:] if t):
            frontier.extend(t for t in node.input[:1 if node.op_type != "Add" else 2] if t and t not in static)
            continue
        if node.op_type not in ("MatMul", "Einsum", "Mul") or len(node.input) != 2:
            continue
        sides = [_through_views(index, t, static) for t in node.input]
        for k in (0, 1):
            table = index.producer_node(sides[k])
            other = sides[1 - k]
            if table is not None and table.op_type in _GATHERS and table.input[0] in index.constant \
                    and other not in static and index.producer_node(other) is not table:
                picked = index.producer_node(other)
                if picked is not None and picked.op_type in _GATHERS and picked.input[0] in index.constant:
                    continue
                return other, any(t and t not in static for t in table.input[1:])
    return None


def row_gather_descents(index: GraphIndex, taken: set[int]) -> dict[str, list[int]]:
    """{table: comparisons} for comparisons with 0 (not in ``taken``) of a value computed from a data-dependent
    Gather of rows of a constant table of 2^D - 1 rows: a hard descent that gathers each node's weight row before
    its dot product (an eval-mode export, ``W[node]``) that ``gathered_dot`` did not trace to one input X (so no
    candidate anchors it): reported, not rewritten."""
    static = static_tensors(index)
    out: dict[str, list[int]] = {}
    for i, node in enumerate(index.nodes):
        if i in taken or node.op_type not in COMPARISONS or is_fff_node(node):
            continue
        _, data_position = COMPARISONS[node.op_type]
        a, zero = (node.input[0], node.input[1]) if data_position == 1 else (node.input[1], node.input[0])
        if a in static or not _is_zero(index, zero):
            continue
        frontier, seen = [a], set()
        while frontier and len(seen) < 64:
            t = frontier.pop()
            if t in seen or t in static:
                continue
            seen.add(t)
            producer = index.producer_node(t)
            if producer is None:
                continue
            if producer.op_type in ("Gather", "GatherND") and producer.input[0] in static \
                    and any(n not in static for n in producer.input[1:]):
                table = index.constant_value(producer.input[0]) if producer.input[0] in index.initializers else None
                rows = None if table is None or table.ndim != 2 else table.shape[0]
                if rows is not None and rows >= 1 and (rows + 1) & rows == 0:
                    out.setdefault(producer.input[0], []).append(i)
                    break
            if producer.op_type in ("Add", "Sub", "Mul", "ReduceSum", "MatMul", "Squeeze", "Unsqueeze", "Reshape",
                                    "Cast", "Einsum"):
                frontier.extend(n for n in producer.input if n)
    return out


def _picks_leaf(index: GraphIndex, i: int, static: set[str], steps: int = 12) -> bool:
    """Whether comparison ``i``'s decision becomes the index of a Gather of a constant table of 2 rows (through casts
    and index arithmetic): a depth-1 hard tree gathers its one node's row by a constant index, its leaf by the
    decision. (The first decision of a deeper tree indexes a table of 2^D - 1 node rows: not this.)"""
    frontier, seen = [o for o in index.nodes[i].output if o], set()
    while frontier and len(seen) < steps:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for c in index.consumers.get(t, ()):
            node = index.nodes[c]
            if node.op_type in _GATHERS and t in node.input[1:]:
                table = index.initializers.get(node.input[0])     # its shape only: no copy of the weights
                if table is not None and len(table.dims) >= 2 and table.dims[0] == 2:
                    return True
            elif node.op_type in ("Cast", "Add", "Sub", "Mul", "Where", "Squeeze", "Unsqueeze", "Reshape", "Not") \
                    or node.op_type in _GATHERS and node.input[0] == t:     # (row r's index of an unrolled loop)
                frontier.extend(o for o in node.output if o)
    return False


def _float_source(index: GraphIndex, a: str) -> str:
    """The tensor that ``a`` is a float cast of (a float16 layer comparing in float32), else ``a``."""
    cast = index.producer_node(a)
    if cast is not None and cast.op_type == "Cast" and any(at.name == "to" and at.i in FLOAT_TYPES for at in cast.attribute):
        return cast.input[0]
    return a


def find_candidates(index: GraphIndex) -> list[Candidate]:
    static = static_tensors(index)
    sigmoid_groups: dict[str, list[int]] = {}
    hard_groups: dict[tuple[str, str], list[int]] = {}
    gathered_groups: dict[tuple[str, str], list[tuple[int, bool, Optional[Candidate]]]] = {}
    candidates: list[Candidate] = []
    signed_logits: dict[int, str] = {}
    for i, node in enumerate(index.nodes):
        if is_fff_node(node) or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Sigmoid":
            x = router_source(index, i, static)
            if x is not None:
                sigmoid_groups.setdefault(x, []).append(i)
            elif (signed := signed_router(index, i, static)) is not None:
                sigmoid_groups.setdefault(signed[0], []).append(i)
                signed_logits[i] = signed[1]
        elif node.op_type in COMPARISONS:
            tie, data_position = COMPARISONS[node.op_type]
            # Greater(a, 0): a is input 0 and 0 is input 1; Less(0, a): the other way round
            a, zero = (node.input[0], node.input[1]) if data_position == 1 else (node.input[1], node.input[0])
            if a in static or not _is_zero(index, zero):
                continue
            picked = index.producer_node(_float_source(index, a))     # (a 16-bit layer deciding in float32)
            if picked is not None and picked.op_type in ("Gather", "GatherElements", "GatherND") \
                    and picked.input[0] not in static and any(n not in static for n in picked.input[1:]):
                # a hard descent: the logit of the current node, picked from every node's logit by its index
                x = trace_source(index, picked.input[0], static)
                if x is not None:
                    hard_groups.setdefault((x, tie), []).append(i)
                continue
            gathered = gathered_dot(index, _float_source(index, a), static)
            neuron = None
            if _read_elsewhere(index, a):      # a decision on a logit nothing else reads is no neuron tree
                cast = index.producer_node(a)
                if cast is not None and cast.op_type == "Cast" and any(
                        at.name == "to" and at.i in FLOAT_TYPES for at in cast.attribute):
                    a = cast.input[0]  # a 16-bit layer deciding in float32
                x = trace_source(index, a, static)
                neuron = Candidate("B", x, [i], tie=tie) if x is not None else None
            if gathered is not None:
                gathered_groups.setdefault((gathered[0], tie), []).append((i, gathered[1], neuron))
            elif neuron is not None:
                candidates.append(neuron)
            elif _picks_leaf(index, i, static) and (x := trace_source(index, _float_source(index, a), static)):
                # depth 1: the one node's logit, a plain projection, decides which leaf row is gathered
                hard_groups.setdefault((_through_views(index, x, static), tie), []).append(i)
    for x, sigmoids in sigmoid_groups.items():
        logits = {i: signed_logits[i] for i in sigmoids if i in signed_logits}
        leaves = [i for i in sigmoids if i not in logits and leaf_activation(index, i, static)]
        if 0 < len(leaves) < len(sigmoids):     # some sigmoids look like leaf activations: routers first
            routers = [i for i in sigmoids if i not in leaves]
            candidates.append(Candidate("A", x, routers, logits=logits, leaf_sigmoids=leaves))
            candidates.append(Candidate("A", x, sigmoids, logits=logits, fallback=True))
        else:
            candidates.append(Candidate("A", x, sigmoids, logits=logits))
    for (x, tie), comparisons in hard_groups.items():
        candidates.append(Candidate("H", x, comparisons, tie=tie))
    for (x, tie), members in gathered_groups.items():
        if any(dynamic for _, dynamic, _ in members):
            candidates.append(Candidate("G", x, [i for i, _, _ in members], tie=tie))
        else:       # every row gathered by a constant index: an ordinary projection
            candidates.extend(neuron for _, _, neuron in members if neuron is not None)
    candidates.sort(key=lambda c: (min(c.anchors + c.leaf_sigmoids), c.fallback))
    return candidates


def split_by_outputs(index: GraphIndex, candidate: Candidate) -> list[Candidate]:
    """The candidate's anchors as the groups whose downstream values meet last (or never): [] when they
    cannot be split (one anchor, or one group).

    Each anchor starts a group; walking the graph in order, a node that reads values of several groups
    merges them. Every tree's own sigmoids meet inside the tree (its mixture); two trees meet only where
    their outputs are combined, after both. The groups just before the last merge are the parts."""
    if len(candidate.anchors) < 2:
        return []

    def walk(stop_at: int):
        parent = {a: a for a in candidate.anchors}

        def find(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        group_of: dict[str, int] = {}
        merges = 0
        for i, node in enumerate(index.nodes):
            if i in parent:
                group_of[node.output[0]] = i
                continue
            roots = {find(group_of[t]) for t in node.input if t in group_of}
            if not roots:
                continue
            if len(roots) > 1:
                if merges == stop_at:
                    break
                merges += 1
                first, *rest = sorted(roots)
                for r in rest:
                    parent[r] = first
            root = find(next(iter(roots)))
            for out in node.output:
                if out:
                    group_of[out] = root
        groups: dict[int, list[int]] = {}
        for a in candidate.anchors:
            groups.setdefault(find(a), []).append(a)
        return merges, list(groups.values())

    merges, groups = walk(stop_at=-1)
    if len(groups) == 1:
        _, groups = walk(stop_at=merges - 1)
    if len(groups) < 2:
        return []
    return [Candidate(candidate.form, candidate.x, g, candidate.tie, list(candidate.notes),
                      {i: z for i, z in candidate.logits.items() if i in g}, list(candidate.leaf_sigmoids),
                      candidate.fallback) for g in groups]
