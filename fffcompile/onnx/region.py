"""The subgraph of a candidate FFF: from its input X to the one tensor Y that carries its result.

Y is a tensor whose value depends on every anchor (all router sigmoids; the comparison of a
neuron tree) and whose backward slice, cut at X, is *closed*:

- every node of the slice either depends on X or computes constants (shared constant nodes
  may stay for other users; they are removed only when nothing reads them any more);
- every value the slice computes from X other than Y is read only inside the slice and is no
  graph output (otherwise removing the slice would change something else: a shared producer),
  except X's shape arithmetic (Shape/Size of X and integer ops on it, which an exporter may share
  between two layers on one input): such nodes stay in the graph (not in ``x_nodes``);
- the slice reads nothing but X and constants (no second input, no value from elsewhere).

Candidates for Y are visited in graph order (linear time: anchor sets are propagated forward
as bit masks), the smallest closed one first; the mixture of a soft tree is closed too, but
extraction rejects it (no leaves) and the search goes on to the next one. A look-alike whose
closed region is found still faces extraction and confirmation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx

from .graph_index import SHAPE_OPS, GraphIndex

MAX_CANDIDATE_OUTPUTS = 48
MAX_DEFERRED_OUTPUTS = 256
LAYOUT_VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


@dataclass
class Region:
    x: str
    y: str
    nodes: set[int]           # every node of the slice (constant and shape-arithmetic nodes included)
    x_nodes: set[int]         # of which those that depend on X (removed by a rewrite)
    shape_sources: tuple[str, ...] = ()   # values outside whose shapes (only) the slice reads

    @property
    def inputs(self) -> list[str]:
        """The inputs of the cut-out region: X, then the shape sources."""
        return [self.x, *self.shape_sources]

    def feed(self, index: GraphIndex, x: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for probe input ``x``: the shape sources get zeros whose leading dims agree with x's rows
        (same leading dims when the ranks agree; otherwise all rows on the last symbolic dim)."""
        feeds = {self.x: x}
        lead = x.shape[:-1]
        for name in self.shape_sources:
            dims = index.shape(name) or []
            symbolic = [k for k, d in enumerate(dims) if not isinstance(d, int)]
            shape = [d if isinstance(d, int) else 1 for d in dims]
            if len(dims) == len(x.shape) and all(isinstance(d, int) and d == x.shape[-1] for d in dims[-1:]):
                shape[:-1] = lead
            elif symbolic:
                shape[symbolic[-1]] = int(np.prod(lead))
            dtype = onnx.helper.tensor_dtype_to_np_dtype(index.elem_type(name) or onnx.TensorProto.FLOAT)
            feeds[name] = np.zeros(shape, dtype)
        return feeds


def closed_region(index: GraphIndex, x: str, y: str, forward: set[int]) -> tuple[Region | None, str]:
    """The closed region X -> Y, or None with the reason it is not closed."""
    nodes = index.backward_slice([y], stop={x}, shape_barrier=forward)
    x_nodes = nodes & forward
    static = _static(index)
    for i in nodes - forward:
        node = index.nodes[i]
        if not all(o in static for o in node.output if o):
            return None, f"the subgraph producing {y!r} reads values other than {x!r} and constants"
    sources = []
    for i in nodes:
        for name in index.inputs_of[i]:
            if not name or name == x or name in index.initializers or index.producer.get(name) in nodes:
                continue
            if all(index.nodes[c].op_type in SHAPE_OPS for c in index.consumers.get(name, ()) if c in nodes):
                if name not in sources:
                    sources.append(name)
                continue
            return None, f"the subgraph producing {y!r} reads {name!r} from outside"
    shape_of_x = _shape_arithmetic(index, x, x_nodes, static)
    shared: set[int] = set()
    for i in sorted(x_nodes):
        for out in index.nodes[i].output:
            if not out or out == y:
                continue
            if out in index.graph_outputs:
                return None, f"{out!r} inside the FFF is also a graph output"
            if any(c not in nodes for c in index.consumers.get(out, ())):
                if i not in shape_of_x:
                    return None, f"{out!r} inside the FFF is also read elsewhere"
                shared.add(i)
    if shared:           # X's shape arithmetic that others read too (an exporter's CSE) stays in the graph
        stack = list(shared)
        while stack:
            for name in index.inputs_of[stack.pop()]:
                producer = index.producer.get(name)
                if producer in shape_of_x and producer not in shared:
                    shared.add(producer)
                    stack.append(producer)
    return Region(x, y, nodes, x_nodes - shared, tuple(sources)), ""


def _shape_arithmetic(index: GraphIndex, x: str, x_nodes: set[int], static: set[str]) -> set[int]:
    """The nodes of ``x_nodes`` that read X only through its shape (Shape/Size of X itself, then ops on that)."""
    found: set[int] = set()
    for i in sorted(x_nodes):
        node = index.nodes[i]
        if (node.op_type in ("Shape", "Size") and node.input[0] == x) or all(name in static or index.producer.get(name) in found
                                                      for name in index.inputs_of[i] if name):
            found.add(i)
    return found


def _static(index: GraphIndex) -> set[str]:
    from .linear_chains import static_tensors
    return static_tensors(index)


def candidate_regions(index: GraphIndex, x: str, anchor_outputs: list[str],
                      other_uses: set[str] = frozenset()) -> Iterator[tuple[Region | None, str]]:
    """Closed regions whose output depends on every anchor (and, when given, on one of ``other_uses``: the leaves
    or the activation, so that a mixture of router outputs alone is no candidate), smallest first; a candidate
    whose rank differs from x's is passed over; one whose shape is static where x's is not comes after the rest."""
    forward = index.forward_from(x)
    # the unflattened input first: a rewrite from it also takes the flattening and restoring reshapes
    entries = [(a, None) for a in layout_ancestors(index, x)][::-1] + [(x, forward)]
    bits = {name: 1 << k for k, name in enumerate(anchor_outputs)}
    other = 1 << len(anchor_outputs)
    full = (1 << len(anchor_outputs)) - 1 | (other if other_uses else 0)
    masks: dict[str, int] = dict(bits)
    for name in other_uses:
        masks[name] = masks.get(name, 0) | other
    ranks = {len(s) for s in (index.shape(e) for e, _ in entries) if s is not None}
    # a value of static shape where x's is symbolic is tried after the others (a row of a loop that the exporter
    # unrolled over the traced rows; or a region bound to its traced shape, ``traced_rows``), with its own budget
    symbolic = any(not isinstance(d, int) for d in index.shape(x) or [1])
    deferred: list[str] = []
    tried = 0
    for i in sorted(forward):
        node = index.nodes[i]
        mask = 0
        for name in index.inputs_of[i]:
            mask |= masks.get(name, 0)
        for out in node.output:
            if not out:
                continue
            masks[out] = masks.get(out, 0) | mask
            if masks[out] == full and out not in bits:
                shape = index.shape(out)
                if shape is not None and ranks and len(shape) not in ranks:
                    continue
                if shape is not None and symbolic and all(isinstance(d, int) for d in shape):
                    deferred.append(out)
                    continue
                tried += 1
                if tried > MAX_CANDIDATE_OUTPUTS:
                    return
                yield _first_closed(index, entries, out)
    for out in deferred[:MAX_DEFERRED_OUTPUTS]:
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
