"""Form A / C extraction: the FFFSpec of a soft leaf-MLP tree region, its weights read back by numbers.

Exporters fold parameter slices into generated initializers (per level, per leaf, transposed),
so weights are reassembled from what the region computes, never from names:

1. Router logits z (the inputs of the anchor sigmoids) and leaf pre-activations a (the ends of
   the projection chains of X that are not router logits, ``linear_chains``) are evaluated on
   the probe rows X = 0, e_1 .. e_d, and random rows: z = x C + b gives node_weight = C^T and
   node_bias = b, with the columns of the sigmoid tensors concatenated in heap order
   (``detect``); a = x W1 + b1 gives leaf_w1 / leaf_b1 with the columns leaf-major
   (leaf j owns columns j l .. j l + l - 1). The random rows check that both are affine.
   Values that keep the rows in a later axis (leaves run as one batched matmul over x expanded
   to (L, rows, d), the per-level-bmm / leaf-major style) are told apart by one more probe row
   (``probes.row_axes``) and read and fed with their rows axis moved first and back.
2. The activation h = act(a) is identified numerically (``activation_match``).
3. The second layer, first where the leaves' outputs meet the mixture (the *frontier*: values
   computed from h but not from p that an op combining them with p reads; one (rows, L, d_out)
   tensor or one per leaf): with h = 0 and h = e_k in every leaf's block at once, l + 1 rows
   read every b2_j and W2_j without running the mixture. If that reading does not confirm, the
   region is cut at the sigmoid outputs p and at h, which become inputs: with p set to the 0/1
   pattern of leaf j's path (mu_j = 1, every other mu = 0) the region computes leaf j's second
   layer on h: y = h W2_j + b2_j; rows h = 0 and h = e_k (k among leaf j's columns) read b2_j
   and W2_j (L (l + 1) rows through the whole region: slow for deep trees, hence second). A tree whose leaves are single linear layers shows W2_j = I, b2_j = 0:
   the spec then has linear leaves.

What this does not prove: that the region is a tree at all, or that heap order is right; the
spec is only a hypothesis until ``confirm`` has run the hardened region against
``reference.hard``. A region without leaf pre-activations (a mixture alone) is refused here.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from ..spec import FFFSpec
from .activation_match import elementwise_closure, match_activation
from .contract import torch_dtype
from .graph_index import GraphIndex, evaluate, make_session
from .linear_chains import chain_ends, projected_tensors, static_tensors, unscaled
from .probes import columns, row_axes, rows_as, shaped, x_layout
from .region import Region

PROBE_BUDGET = 1 << 25      # floats per probe run (region values), to bound memory on deep trees


class NotExtracted(Exception):
    """The region is not (or not provably) the form this extractor reads; the message says why."""


def input_dtypes(index: GraphIndex, region: Region) -> tuple[torch.dtype, type]:
    """The FFF input's torch dtype, and the numpy dtype its probes are fed in (float64 or float32)."""
    try:
        dtype = torch_dtype(index.elem_type(region.x))
    except KeyError:
        raise NotExtracted("the FFF input is not a floating-point tensor")
    return dtype, (np.float64 if dtype == torch.float64 else np.float32)


def affine_probes(d_in: int, extra: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.zeros((1, d_in)), np.eye(d_in), rng.standard_normal((extra, d_in))])


def read_affine(values: np.ndarray, probes: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(W (d_in, k), b (k,)) from a value's (R, k) probe rows, checked on the random rows."""
    d_in = probes.shape[1]
    values = values.astype(np.float64)
    b = values[0]
    W = values[1:d_in + 1] - b
    check = probes[d_in + 1:] @ W + b
    scale = max(1.0, float(np.abs(values).max()))
    if not np.allclose(check, values[d_in + 1:], rtol=1e-4, atol=1e-4 * scale):
        raise NotExtracted(f"{what} is not an affine function of the FFF input")
    return W, b


def extract_leaf_tree(index: GraphIndex, region: Region, sigmoids: list[int],
                      logits: Optional[dict[int, str]] = None) -> Iterator[FFFSpec]:
    """Spec hypotheses, cheapest reading first (see the module doc); ``confirm`` keeps the first that holds.
    ``logits``: for signed-path sigmoids s(z[nodes] * S), the router logit z each one gathers (read instead of
    the sigmoid's input; several may share one z)."""
    rank, d_in = x_layout(index.shape(region.x))
    dtype, np_dtype = input_dtypes(index, region)
    static = static_tensors(index)
    logits = logits or {}
    sigmoid_inputs = {index.nodes[i].input[0] for i in sigmoids}
    sigmoid_inputs |= {unscaled(index, z, static) for z in sigmoid_inputs} - {None}     # s(z / T): z is no leaf
    firsts = {}
    for i in sigmoids:
        firsts.setdefault(logits.get(i, index.nodes[i].input[0]), i)
    sigmoids_read = list(firsts.values())           # one per logit read (signed paths share theirs)
    z_names = list(firsts)
    p_names = [index.nodes[i].output[0] for i in sigmoids]
    projected = projected_tensors(index, region.x, region.x_nodes, static)
    routing = set().union(*(index.forward_from(z) for z in set(logits.values())))    # signed paths: z's gathers
    ends = [t for t in chain_ends(index, projected, region.nodes)
            if t not in z_names and t not in sigmoid_inputs and index.producer.get(t) not in routing]
    if not ends:
        raise NotExtracted("no leaf computation reads the FFF input (a mixture of router outputs only)")

    # 1. taps: router logits, leaf pre-activations and every candidate activation value
    closures = {a: elementwise_closure(index, a, region.nodes) for a in ends}
    taps = list(dict.fromkeys(z_names + ends + [v for vs in closures.values() for v in vs]))
    probes = affine_probes(d_in)
    rows = probes.shape[0]
    model = index.submodel(index.backward_slice(taps, stop={region.x}) & region.nodes, region.inputs, taps)
    values = evaluate(model, region.feed(index, shaped(probes.astype(np_dtype), rank)), taps)
    one_more = np.concatenate([probes, affine_probes(d_in, extra=1, seed=1)[-1:]])       # rows in a later axis?
    axes = row_axes(values, evaluate(model, region.feed(index, shaped(one_more.astype(np_dtype), rank)), taps))
    z_cols = [columns(values[z], rows, axes.get(z)) for z in z_names]
    widths = [c.shape[1] for c in z_cols]
    order = sorted(range(len(z_names)), key=lambda k: (widths[k], sigmoids_read[k]))
    z_all = np.concatenate([z_cols[k] for k in order], 1)
    node_w, node_b = read_affine(z_all, probes, "a router logit")
    n_nodes = node_w.shape[1]
    depth = (n_nodes + 1).bit_length() - 1
    if 2 ** depth - 1 != n_nodes:
        raise NotExtracted(f"{n_nodes} router columns is not 2^D - 1 for any depth D")
    leaves = 2 ** depth

    # 2. leaf first layer and activation
    acts, h_names, W1, b1 = read_leaf_first_layers(index, region, values, ends, closures, rows, axes, probes)
    if len(acts) != 1:
        raise NotExtracted(f"the leaves use different activations ({', '.join(sorted(acts))})")
    activation = acts.pop()
    if W1.shape[1] % leaves:
        raise NotExtracted(f"{W1.shape[1]} leaf hidden units do not split into {leaves} leaves")
    width = W1.shape[1] // leaves
    leaf_w1 = W1.reshape(d_in, leaves, width).transpose(1, 0, 2)
    leaf_b1 = b1.reshape(leaves, width)

    # 3. second layer, read where the leaves' outputs meet the mixture, else through the mixture leaf by leaf
    h_shapes = [values[h].shape for h in h_names]
    h_widths = [columns(values[h], rows, axes.get(h)).shape[1] for h in h_names]
    p_shapes = [values[z].shape for z in z_names]
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    def spec(leaf_w2, leaf_b2):
        linear = (activation == "identity" and width == leaf_b2.shape[1]
                  and np.allclose(leaf_w2, np.eye(width)[None], atol=1e-5) and np.allclose(leaf_b2, 0, atol=1e-6))
        return FFFSpec(form="leaf_mlp", depth=depth, activation=activation, node_weight=to(node_w.T),
                       node_bias=to(node_b), leaf_w1=to(leaf_w1), leaf_b1=to(leaf_b1),
                       leaf_w2=None if linear else to(leaf_w2), leaf_b2=None if linear else to(leaf_b2),
                       tie="ge", source="soft")

    def h_feeds(h_rows, R):
        feeds, offset = {}, 0
        for name, shape, w in zip(h_names, h_shapes, h_widths):
            feeds[name] = rows_as(h_rows[:, offset:offset + w].astype(np_dtype), shape, rows, axes.get(name))
            offset += w
        return feeds

    frontier = _frontier(index, region, p_names, h_names)
    if not frontier and activation == "identity":
        # the mixture reads the leaf projections themselves: single linear leaves, y = x W1_j + b1_j
        yield spec(np.broadcast_to(np.eye(width), (leaves, width, width)), np.zeros((leaves, width)))
    if frontier:
        # (a) all leaves at once: h = 0 and h = e_k in every leaf's block; the leaves' outputs are read before
        # the mixture (one (rows, L, d_out) tensor, or one (rows, d_out) tensor per leaf in leaf order)
        R = width + 1
        h_rows = np.zeros((R, leaves * width))
        for k in range(width):
            h_rows[1 + k, k::width] = 1.0
        nodes = index.backward_slice(frontier, stop={region.x, *h_names, *region.shape_sources}) & region.nodes
        try:
            reader = make_session(index.submodel(nodes, [*region.inputs, *h_names], frontier))
            h_more = np.concatenate([h_rows, np.zeros((1, h_rows.shape[1]))])       # one more row: the rows axis
            out, more = (evaluate(reader, {**region.feed(index, shaped(np.zeros((len(h), d_in), np_dtype), rank)),
                                           **h_feeds(h, len(h))}, frontier) for h in (h_rows, h_more))
            frontier_axes = row_axes(out, more)
            f = np.concatenate([columns(out[t], R, frontier_axes.get(t)) for t in frontier], 1).astype(np.float64)
        except Exception:
            f = None
        if f is not None and f.shape[1] % leaves == 0:
            f = f.reshape(R, leaves, -1)
            yield spec((f[1:] - f[:1]).transpose(1, 0, 2), f[0])

    if logits:      # signed paths: the sigmoids hold gathered path columns, not heap-ordered node columns
        return
    # (b) one leaf per row through the mixture: p = leaf j's path pattern, h = 0 and e_k in leaf j's block
    cut = set(p_names) | set(h_names) | {region.x}
    nodes = index.backward_slice([region.y], stop=cut | set(region.shape_sources)) & region.nodes
    second = make_session(index.submodel(nodes, [*region.inputs, *p_names, *h_names], [region.y]))
    per_leaf = width + 1
    y_shape = index.shape(region.y)
    d_out_guess = y_shape[-1] if y_shape and isinstance(y_shape[-1], int) else d_in
    chunk_leaves = max(1, PROBE_BUDGET // max(1, per_leaf * leaves * (width + d_out_guess) * 2))
    outputs = []
    for start in range(0, leaves, chunk_leaves):
        block = list(range(start, min(leaves, start + chunk_leaves)))
        R = len(block) * per_leaf
        p_rows = np.zeros((R, n_nodes))
        h_rows = np.zeros((R, leaves * width))
        for b, j in enumerate(block):
            path = _path_pattern(depth, j)
            p_rows[b * per_leaf:(b + 1) * per_leaf] = path
            for k in range(width):
                h_rows[b * per_leaf + 1 + k, j * width + k] = 1.0
        feeds = {**region.feed(index, shaped(np.zeros((R, d_in), np_dtype), rank)), **h_feeds(h_rows, R)}
        offset = 0
        for k in order:      # heap-ordered columns back to each sigmoid's own tensor
            w = widths[k]
            feeds[p_names[k]] = rows_as(p_rows[:, offset:offset + w].astype(np_dtype), p_shapes[k], rows, axes.get(z_names[k]))
            offset += w
        y = columns(evaluate(second, feeds, [region.y])[region.y], R).astype(np.float64)
        outputs.append(y.reshape(len(block), per_leaf, -1))
    y = np.concatenate(outputs)                      # (L, l + 1, d_out)
    yield spec(y[:, 1:] - y[:, :1], y[:, 0])


def read_leaf_first_layers(index: GraphIndex, region: Region, values: dict, ends: list[str], closures: dict,
                           rows: int, axes: dict, probes: np.ndarray):
    """The leaves' first layer: each pre-activation a in ``ends`` read as an affine map of the probe rows
    (W, b), and its activation matched by numbers among the values of ``closures[a]``. Returns (the set of
    activations found, the activated value of each end, W1 and b1 with the ends' columns concatenated)."""
    acts, h_names, w1_parts, b1_parts = set(), [], [], []
    narrow = getattr(index, "narrow_dtypes", {}).get(region.x, torch.float32)
    for a in ends:
        W, b = read_affine(columns(values[a], rows, axes.get(a)), probes, "a leaf pre-activation")
        act, h = match_activation(values[a], {v: values[v] for v in closures[a]}, narrow)
        acts.add(act)
        h_names.append(h or a)
        w1_parts.append(W)
        b1_parts.append(b)
    return acts, h_names, np.concatenate(w1_parts, 1), np.concatenate(b1_parts)


def _frontier(index: GraphIndex, region: Region, p_names: list[str], h_names: list[str]) -> list[str]:
    """Values computed from the leaves' activations but not from the router outputs that an op combining
    them with the router outputs reads: where the leaves' outputs meet the mixture (graph order)."""
    dep_p, dep_h = set(p_names), set(h_names)
    for i in sorted(region.nodes):
        node = index.nodes[i]
        ins = index.inputs_of[i]
        outs = [o for o in node.output if o]
        if any(n in dep_p for n in ins):
            dep_p.update(outs)
        elif any(n in dep_h for n in ins):
            dep_h.update(outs)
    frontier = []
    for t in dep_h - dep_p:
        readers = [index.nodes[c] for c in index.consumers.get(t, ()) if c in region.nodes]
        if any(o in dep_p for r in readers for o in r.output):
            frontier.append(t)
    if any(t in h_names for t in frontier):
        return []        # the mixture meets the activations themselves: no leaf output to read apart
    return sorted(frontier, key=lambda t: index.producer.get(t, -1))


def _path_pattern(depth: int, leaf: int) -> np.ndarray:
    """Router outputs (heap order) that send every row to ``leaf``: 1 = right, off-path nodes 0."""
    p = np.zeros(2 ** depth - 1)
    node = 0
    for level in range(depth):
        bit = (leaf >> (depth - 1 - level)) & 1
        p[node] = bit
        node = 2 * node + 1 + bit
    return p
