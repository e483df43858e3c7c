"""The subgraph of a candidate FFF: from its input X to the one tensor Y that carries its result.

Y is a tensor whose value depends on every anchor (all router sigmoids; the comparison of a
neuron tree) and whose backward slice, cut at X, is *closed*:

- every node of the slice either depends on X or computes constants (shared constant nodes
  may stay for other users; they are removed only when nothing reads them any more);
- every value the slice computes from X other than Y is read only inside the slice and is no
  graph output (otherwise removing the slice would change something else: a shared producer);
- the slice reads nothing but X and constants (no second input, no value from elsewhere).

Candidates for Y are visited in graph order (linear time: anchor sets are propagated forward
as bit masks), the smallest closed one first; the mixture of a soft tree is closed too, but
extraction rejects it (no leaves) and the search goes on to the next one. A look-alike whose
closed region is found still faces extraction and confirmation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .graph_index import GraphIndex, node_inputs

MAX_CANDIDATE_OUTPUTS = 48
LAYOUT_VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


@dataclass
class Region:
    x: str
    y: str
    nodes: set[int]           # every node of the slice (constant nodes included)
    x_nodes: set[int]         # of which those that depend on X (removed by a rewrite)


def closed_region(index: GraphIndex, x: str, y: str, forward: set[int]) -> tuple[Region | None, str]:
    """The closed region X -> Y, or None with the reason it is not closed."""
    nodes = index.backward_slice([y], stop={x})
    x_nodes = nodes & forward
    for i in nodes - forward:
        node = index.nodes[i]
        if not all(o in index.constant for o in node.output if o):
            return None, f"the subgraph producing {y!r} reads values other than {x!r} and constants"
    for i in nodes:
        for name in node_inputs(index.nodes[i]):
            if name and name != x and name not in index.initializers and index.producer.get(name) not in nodes:
                return None, f"the subgraph producing {y!r} reads {name!r} from outside"
    for i in x_nodes:
        for out in index.nodes[i].output:
            if not out or out == y:
                continue
            if out in index.graph_outputs:
                return None, f"{out!r} inside the FFF is also a graph output"
            if any(c not in nodes for c in index.consumers.get(out, ())):
                return None, f"{out!r} inside the FFF is also read elsewhere"
    return Region(x, y, nodes, x_nodes), ""


def candidate_regions(index: GraphIndex, x: str, anchor_outputs: list[str],
                      other_uses: set[str] = frozenset()) -> Iterator[tuple[Region | None, str]]:
    """Closed regions whose output depends on every anchor (and, when given, on one of ``other_uses``: the leaves
    or the activation, so that a mixture of router outputs alone is no candidate), smallest first; a candidate
    whose rank differs from x's is passed over."""
    forward = index.forward_from(x)
    entries = [(x, forward)] + [(a, None) for a in layout_ancestors(index, x)]
    bits = {name: 1 << k for k, name in enumerate(anchor_outputs)}
    other = 1 << len(anchor_outputs)
    full = (1 << len(anchor_outputs)) - 1 | (other if other_uses else 0)
    masks: dict[str, int] = dict(bits)
    for name in other_uses:
        masks[name] = masks.get(name, 0) | other
    ranks = {len(s) for s in (index.shape(e) for e, _ in entries) if s is not None}
    tried = 0
    for i in sorted(forward):
        node = index.nodes[i]
        mask = 0
        for name in node_inputs(node):
            mask |= masks.get(name, 0)
        for out in node.output:
            if not out:
                continue
            masks[out] = masks.get(out, 0) | mask
            if masks[out] == full and out not in bits:
                shape = index.shape(out)
                if shape is not None and ranks and len(shape) not in ranks:
                    continue
                tried += 1
                if tried > MAX_CANDIDATE_OUTPUTS:
                    return
                yield _first_closed(index, entries, out)


def _first_closed(index: GraphIndex, entries: list, y: str) -> tuple[Region | None, str]:
    """The region ending at y from x or, when it also reads x's own source (shape arithmetic on the
    unflattened input), from that source."""
    first_reason = ""
    for k, (x, forward) in enumerate(entries):
        if forward is None:
            forward = entries[k] = (x, index.forward_from(x))
            forward = forward[1]
        region, why = closed_region(index, x, y, forward)
        if region is not None:
            return region, ""
        first_reason = first_reason or why
    return None, first_reason


def layout_ancestors(index: GraphIndex, x: str, limit: int = 4) -> list[str]:
    """Tensors x is a reshaped view of (Reshape, Flatten, Squeeze, Unsqueeze, Identity), nearest first."""
    out = []
    while len(out) < limit:
        node = index.producer_node(x)
        if node is None or node.op_type not in LAYOUT_VIEWS:
            break
        x = node.input[0]
        if x in index.constant:
            break
        out.append(x)
    return out
