"""The reference: soft and hard semantics of every FFF form, the oracle of every test.

Everything here follows ../shared/FORMS.md literally (see ``fffcompile.spec`` for the
notation). The hard functions are vectorised gathers (no Python loop over rows or leaves; one
loop over the D levels and one over row chunks that bound memory), so they also serve as the
op's pure-torch implementation.

Arithmetic: float32 and float64 compute in their own dtype; bfloat16 and float16 are upcast to
float32, computed, and the output rounded back once. Every backend follows the same rule, so
decisions agree except where |z| is within rounding of zero; ``route`` returns that margin so
that comparisons can tell a tie-induced leaf flip from a wrong kernel.

- ``hard(spec, x)``: the hardened descent, y = f_leaf(x) (forms A, C) or the sum over path
  neurons (form B).
- ``soft(spec, x, harden=False)``: the training form. Form A mixes every leaf with path
  probabilities mu_j(x) = prod_n (p_n or 1 - p_n); with ``harden=True`` every p_n becomes the
  step [z_n >= 0] (or [z_n > 0] under tie "gt"), which equals ``hard``. Form B's training graph
  is the dense layer times a 0/1 path mask: computed that way, it is already hard.
- ``leaf_weights(spec, x)``: mu (form A), for fidelity figures.
- ``route(spec, x)``: nodes visited, leaf per tree, and the smallest |z| met on the way.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from . import activations
from .spec import FFFSpec

# Rows per chunk are chosen so that one gathered weight block holds about this many elements.
_CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float32 for the 16-bit types, else the dtype itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class Route(NamedTuple):
    nodes: torch.Tensor   # (R, P, K) int64: the K decision nodes (A: D routing nodes; B: D+1 neurons) per tree
    leaf: torch.Tensor    # (R, P) int64: leaf index in [0, 2^D)
    margin: torch.Tensor  # (R,) smallest |z| over the decisions taken (inf at depth 0)


def _flatten(spec: FFFSpec, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != spec.d_in:
        raise ValueError(f"input has last dim {x.shape[-1]}, the FFF expects d_in = {spec.d_in}")
    return x.reshape(-1, spec.d_in).to(compute_dtype(spec.dtype))


def _weights(spec: FFFSpec) -> FFFSpec:
    return spec.to(compute_dtype(spec.dtype))


def _chunks(rows: int, per_row: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _go_right(z: torch.Tensor, tie: str) -> torch.Tensor:
    return z >= 0 if tie == "ge" else z > 0


def _node_weights_per_tree(spec: FFFSpec):
    """Node weights as (P, nodes, d_in) and biases as (P, nodes), for both forms."""
    if spec.form == "leaf_mlp":
        return spec.node_weight.unsqueeze(0), spec.node_bias.unsqueeze(0)
    return spec.node_weight, spec.node_bias


def _descend(spec: FFFSpec, X: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (nodes (R, P), z (R, P)) for each decision level, root first; X in compute dtype."""
    W, b = _node_weights_per_tree(spec)
    trees = W.shape[0]
    tree_index = torch.arange(trees, device=X.device).unsqueeze(0)
    levels = spec.depth if spec.form == "leaf_mlp" else spec.depth + 1
    nodes = torch.zeros(X.shape[0], trees, dtype=torch.int64, device=X.device)
    for level in range(levels):
        z = torch.empty(X.shape[0], trees, dtype=X.dtype, device=X.device)
        for rows in _chunks(X.shape[0], trees * spec.d_in):
            n = nodes[rows]
            w = W[tree_index, n]                                   # (r, P, d_in)
            z[rows] = torch.einsum("rd,rpd->rp", X[rows], w) + b[tree_index, n]
        yield nodes, z
        if level + 1 < levels:
            nodes = 2 * nodes + 1 + _go_right(z, spec.tie).long()


def route(spec: FFFSpec, x: torch.Tensor) -> Route:
    """The hard path of every row: visited nodes, leaf per tree, smallest decision margin."""
    spec = _weights(spec)
    X = _flatten(spec, x)
    visited, margins = [], []
    last_z = None
    for nodes, z in _descend(spec, X):
        visited.append(nodes)
        margins.append(z.abs())
        last_z = z
    rows = X.shape[0]
    trees = spec.trees
    if spec.form == "leaf_mlp":
        if visited:
            last = 2 * visited[-1] + 1 + _go_right(last_z, spec.tie).long()
            leaf = last - (2 ** spec.depth - 1)
        else:
            leaf = torch.zeros(rows, trees, dtype=torch.int64, device=X.device)
        decisions = margins
    else:
        leaf = visited[-1] - (2 ** spec.depth - 1)
        decisions = margins[:-1]  # the last neuron's sign chooses nothing
    nodes = torch.stack(visited, -1) if visited else torch.zeros(rows, trees, 0, dtype=torch.int64, device=X.device)
    if decisions:
        margin = torch.stack(decisions, -1).flatten(1).amin(1) if rows else torch.zeros(0, device=X.device)
    else:
        margin = torch.full((rows,), float("inf"), dtype=X.dtype, device=X.device)
    return Route(nodes, leaf, margin)


def _leaf_mlp(spec: FFFSpec, X: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """f_leaf(x) row by row via gathered leaf weights; leaf (R,) int64."""
    out = X.new_empty(X.shape[0], spec.d_out)
    per_row = spec.leaf_width * (spec.d_in + (spec.d_out if spec.leaf_w2 is not None else 0))
    for rows in _chunks(X.shape[0], per_row):
        j = leaf[rows]
        h = torch.bmm(X[rows].unsqueeze(1), spec.leaf_w1[j]).squeeze(1) + spec.leaf_b1[j]
        h = activations.apply(spec.activation, h)
        if spec.leaf_w2 is not None:
            h = torch.bmm(h.unsqueeze(1), spec.leaf_w2[j]).squeeze(1) + spec.leaf_b2[j]
        out[rows] = h
    return out


def _master_blend(spec: FFFSpec, X: torch.Tensor, tree_out: torch.Tensor) -> torch.Tensor:
    if not spec.has_master:
        return tree_out
    m = activations.apply(spec.master_activation, X @ spec.master_w1 + spec.master_b1) @ spec.master_w2 + spec.master_b2
    k = torch.sigmoid(spec.master_logit.reshape(()))
    return k * tree_out + (1 - k) * m


def hard(spec: FFFSpec, x: torch.Tensor) -> torch.Tensor:
    """The hardened descent of FORMS.md for input (..., d_in) -> (..., d_out)."""
    out_dtype = x.dtype
    lead = x.shape[:-1]
    spec = _weights(spec)
    X = _flatten(spec, x)
    if spec.form == "leaf_mlp":
        leaf = route(spec, X).leaf[:, 0]
        y = _master_blend(spec, X, _leaf_mlp(spec, X, leaf))
    else:
        y = X.new_zeros(X.shape[0], spec.d_out) + spec.out_bias
        tree_index = torch.arange(spec.trees, device=X.device).unsqueeze(0)
        for nodes, a in _descend(spec, X):
            for rows in _chunks(X.shape[0], spec.trees * spec.d_out):
                v = spec.out_weight[tree_index, nodes[rows]]      # (r, P, d_out)
                y[rows] += torch.einsum("rp,rpo->ro", activations.apply(spec.activation, a[rows]), v)
    return y.to(out_dtype).reshape(*lead, spec.d_out)


def leaf_weights(spec: FFFSpec, x: torch.Tensor, harden: bool = False) -> torch.Tensor:
    """Form A path probabilities mu (R, 2^D): leaf j's weight is the product along its path."""
    spec = _weights(spec)
    X = _flatten(spec, x)
    z = X @ spec.node_weight.T + spec.node_bias
    p = _go_right(z, spec.tie).to(X.dtype) if harden else torch.sigmoid(z)
    mu = X.new_ones(X.shape[0], 1)
    for level in range(spec.depth):
        p_level = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
        mu = torch.stack((mu * (1 - p_level), mu * p_level), -1).reshape(X.shape[0], 2 ** (level + 1))
    return mu


def soft(spec: FFFSpec, x: torch.Tensor, harden: bool = False) -> torch.Tensor:
    """The training form: every leaf (or every neuron) computed, mixed (or masked) by the tree."""
    out_dtype = x.dtype
    lead = x.shape[:-1]
    spec = _weights(spec)
    X = _flatten(spec, x)
    y = X.new_empty(X.shape[0], spec.d_out)
    if spec.form == "leaf_mlp":
        mu = leaf_weights(spec, X, harden=harden)
        for rows in _chunks(X.shape[0], spec.n_leaves * (spec.leaf_width + spec.d_out)):
            h = activations.apply(spec.activation, torch.einsum("rd,ldh->rlh", X[rows], spec.leaf_w1) + spec.leaf_b1)
            if spec.leaf_w2 is not None:
                h = torch.einsum("rlh,lho->rlo", h, spec.leaf_w2) + spec.leaf_b2
            y[rows] = torch.einsum("rl,rlo->ro", mu[rows], h)
        y = _master_blend(spec, X, y)
    else:
        nodes = route(spec, X).nodes                                 # (R, P, D+1)
        mask = X.new_zeros(X.shape[0], spec.trees, spec.nodes_per_tree)
        mask.scatter_(2, nodes, 1.0)
        a = torch.einsum("rd,pnd->rpn", X, spec.node_weight) + spec.node_bias
        y = torch.einsum("rpn,pno->ro", activations.apply(spec.activation, a) * mask, spec.out_weight) + spec.out_bias
    return y.to(out_dtype).reshape(*lead, spec.d_out)


def near_ties(spec: FFFSpec, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows (R,) whose hard path passes a decision with |z| within rounding of zero.

    Two implementations that sum a length-d_in dot product in different orders differ by about
    sqrt(d_in) * eps * (|x| . |w_n| + |b_n|); rows within 8 times that of a tie, at any decision
    on their path, are flagged. ``dtype`` is the arithmetic of the other side (default: the
    spec's compute dtype).
    """
    spec = _weights(spec)
    X = _flatten(spec, x)
    eps = torch.finfo(compute_dtype(dtype) if dtype is not None else X.dtype).eps
    W, b = _node_weights_per_tree(spec)
    tree_index = torch.arange(spec.trees, device=X.device).unsqueeze(0)
    near = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    levels = list(_descend(spec, X))
    if spec.form == "neuron_tree":
        levels = levels[:-1]
    bound = 8 * spec.d_in ** 0.5 * eps
    for nodes, z in levels:
        scale = torch.einsum("rd,rpd->rp", X.abs(), W[tree_index, nodes].abs()) + b[tree_index, nodes].abs()
        near |= (z.abs() <= bound * scale).any(-1)
    return near
