"""Leaves of a hard descent that computes every leaf and picks the reached one's output.

A hard form-A layer may run every leaf MLP densely, f_j(x) = act(x W1_j + b1_j) W2_j + b2_j for
all j (one einsum, a (rows, L, d_out) tensor), and only then pick leaf n - (2^D - 1) by a gather
whose index comes from the descent's decisions. No leaf weight table is gathered, so the weights
are read back by numbers, as for a soft tree (``extract_leaf_tree``):

1. the leaf pre-activations a are the ends of X's projection chains (``linear_chains``) other than
   the router logits; on the probe rows X = 0, e_1 .. e_d (and random rows: checked affine) they give
   W1 and b1, leaf-major (leaf j owns columns j l .. j l + l - 1); the activation h = act(a) is
   matched numerically (``activation_match``);
2. the second layer is read where the leaves' outputs meet the decisions (the *frontier*: values
   computed from h but not from the comparisons that an op reading the comparisons' results also
   reads, i.e. the data of the picking gather): with h = 0 and h = e_k in every leaf's block, l + 1
   rows read every b2_j and W2_j. When the gather picks h itself, the leaves are single linear layers.

The result is only a reading; ``confirm`` runs the region against ``reference.hard`` of the spec
before anything is rewritten. Must not fire where the leaves' values are not affine-then-elementwise
in X or do not split into 2^D equal blocks: nothing is read, and the region stays as it is.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .activation_match import elementwise_closure
from .extract_leaf_tree import _frontier, affine_probes, read_leaf_first_layers
from .graph_index import GraphIndex, evaluate, make_session
from .linear_chains import chain_ends, projected_tensors, static_tensors
from .probes import columns, row_axes, rows_as, shaped, x_layout
from .region import Region


def computed_leaves(index: GraphIndex, region: Region, decisions: list[str], depth: int, np_dtype,
                    exclude: tuple[str, ...] = ()) -> Iterator[tuple]:
    """Readings (activation, leaf_w1, leaf_b1, leaf_w2, leaf_b2) of the leaves the region computes densely;
    ``decisions``: the comparisons' outputs, ``exclude``: projections of X that are router logits (what is computed from them is no leaf either)."""
    rank, d_in = x_layout(index.shape(region.x))
    leaves = 2 ** depth
    static = static_tensors(index)
    projected = projected_tensors(index, region.x, region.x_nodes, static)
    from_logits = set().union(*(index.forward_from(e) for e in exclude)) if exclude else set()
    ends = [t for t in chain_ends(index, projected, region.nodes)
            if t not in exclude and index.producer.get(t) not in from_logits]   # (a logit picked per level: no leaf)
    if not ends:
        return
    closures = {a: elementwise_closure(index, a, region.nodes) for a in ends}
    taps = list(dict.fromkeys(ends + [v for vs in closures.values() for v in vs]))
    probes = affine_probes(d_in)
    rows = probes.shape[0]
    model = index.submodel(index.backward_slice(taps, stop={region.x}) & region.nodes, region.inputs, taps)
    values = evaluate(model, region.feed(index, shaped(probes.astype(np_dtype), rank)), taps)
    one_more = np.concatenate([probes, affine_probes(d_in, extra=1, seed=1)[-1:]])
    axes = row_axes(values, evaluate(model, region.feed(index, shaped(one_more.astype(np_dtype), rank)), taps))
    acts, h_names, W1, b1 = read_leaf_first_layers(index, region, values, ends, closures, rows, axes, probes)
    if len(acts) != 1 or W1.shape[1] % leaves:
        return
    activation = acts.pop()
    width = W1.shape[1] // leaves
    leaf_w1, leaf_b1 = W1.reshape(d_in, leaves, width).transpose(1, 0, 2), b1.reshape(leaves, width)
    frontier = _frontier(index, region, decisions, h_names)
    if not frontier:
        if activation == "identity":     # the gather picks the leaf projections themselves: linear leaves
            yield activation, leaf_w1, leaf_b1, None, None
        return
    R = width + 1
    h_rows = np.zeros((R, leaves * width))
    for k in range(width):
        h_rows[1 + k, k::width] = 1.0
    h_shapes = [values[h].shape for h in h_names]
    h_widths = [columns(values[h], rows, axes.get(h)).shape[1] for h in h_names]

    def feeds(h_block):
        out, offset = {}, 0
        for name, shape, w in zip(h_names, h_shapes, h_widths):
            out[name] = rows_as(h_block[:, offset:offset + w].astype(np_dtype), shape, rows, axes.get(name))
            offset += w
        return out

    nodes = index.backward_slice(frontier, stop={region.x, *h_names, *region.shape_sources}) & region.nodes
    try:
        reader = make_session(index.submodel(nodes, [*region.inputs, *h_names], frontier))
        h_more = np.concatenate([h_rows, np.zeros((1, h_rows.shape[1]))])
        out, more = (evaluate(reader, {**region.feed(index, shaped(np.zeros((len(h), d_in), np_dtype), rank)),
                                       **feeds(h)}, frontier) for h in (h_rows, h_more))
        frontier_axes = row_axes(out, more)
        floats = [t for t in frontier if np.asarray(out[t]).dtype.kind == "f"]   # (not the gather's index arithmetic)
        f = np.concatenate([_rows(out[t], more[t], R, frontier_axes.get(t)) for t in floats], 1).astype(np.float64)
    except Exception:       # a frontier that cannot be fed this way: no reading
        return
    if f.shape[1] % leaves:
        return
    f = f.reshape(R, leaves, -1)
    yield activation, leaf_w1, leaf_b1, (f[1:] - f[:1]).transpose(1, 0, 2), f[0]


def _rows(value: np.ndarray, more: np.ndarray, R: int, axis) -> np.ndarray:
    """``value`` as (R, columns): its rows axis, or a leading axis that holds rows x leaves flattened together
    (a legacy export picks the leaf from Flatten(every) (rows * L, d_out) by row * L + leaf)."""
    value, more = np.asarray(value), np.asarray(more)
    if axis is None and value.ndim >= 1 and value.shape[0] != R and value.shape[0] % R == 0 \
            and more.shape[0] == value.shape[0] // R * (R + 1):
        return value.reshape(R, -1)
    return columns(value, R, axis)
