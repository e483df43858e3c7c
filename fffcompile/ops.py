"""The fused descent ops: ``torch.ops.fffcompile.leaf_mlp_tree`` and ``torch.ops.fffcompile.neuron_tree``.

One op per form (FORMS.md A and B; form C's master leaf is plain torch around the form-A op):

    leaf_mlp_tree(x, node_weight (N, d_in), node_bias (N,), leaf_w1 (L, d_in, l), leaf_b1 (L, l),
                  leaf_w2 (L, l, d_out)?, leaf_b2 (L, d_out)?, activation, tie) -> (..., d_out)
    neuron_tree(x, node_weight (P, n, d_in), node_bias (P, n), out_weight (P, n, d_out),
                out_bias (d_out,), activation, tie) -> (..., d_out)

The depth is implied by the shapes (N = 2^D - 1, n = 2^(D+1) - 1). ``tie`` is "ge" (go right
when z >= 0) or "gt" (z > 0). x has any leading dims (batch 0 included) and the weights' dtype
(float32, float64, bfloat16, float16; 16-bit types accumulate in float32).

Implementations: a fake (shape) function for tracing and export, and the pure-torch
vectorised implementation from ``fffcompile.reference`` for every device; faster kernels
register per device with a capability check (``fffcompile.runtime``). Autograd: the decisions
are a step function, so node weights receive zero gradient; x and the weights of the leaf (or
the neurons) that each row used receive the exact gradient of the hardened layer, so a
hardened model can be fine-tuned.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import activations, reference
from .spec import FFFSpec


def spec_from_leaf_mlp_args(node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, activation, tie) -> FFFSpec:
    depth = (node_weight.shape[0] + 1).bit_length() - 1
    return FFFSpec("leaf_mlp", depth, activation, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2,
                   tie=tie, source="hard")


def spec_from_neuron_tree_args(node_weight, node_bias, out_weight, out_bias, activation, tie) -> FFFSpec:
    depth = (node_weight.shape[1] + 1).bit_length() - 2
    return FFFSpec("neuron_tree", depth, activation, node_weight, node_bias, out_weight=out_weight,
                   out_bias=out_bias, tie=tie, source="hard")


# ----------------------------------------------------------------------------- form A

@torch.library.custom_op("fffcompile::leaf_mlp_tree", mutates_args=())
def leaf_mlp_tree(x: Tensor, node_weight: Tensor, node_bias: Tensor, leaf_w1: Tensor, leaf_b1: Tensor,
                  leaf_w2: Optional[Tensor], leaf_b2: Optional[Tensor], activation: str, tie: str) -> Tensor:
    spec = spec_from_leaf_mlp_args(node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, activation, tie)
    return reference.hard(spec, x)


@leaf_mlp_tree.register_fake
def _(x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, activation, tie):
    d_out = (leaf_w2 if leaf_w2 is not None else leaf_w1).shape[-1]
    return x.new_empty(*x.shape[:-1], d_out)


def _leaf_mlp_setup(ctx, inputs, output):
    x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, activation, tie = inputs
    ctx.activation, ctx.tie, ctx.linear = activation, tie, leaf_w2 is None
    ctx.save_for_backward(x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2)


def _leaf_mlp_backward(ctx, grad):
    x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2 = ctx.saved_tensors
    spec = spec_from_leaf_mlp_args(node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, ctx.activation, ctx.tie)
    cd = reference.compute_dtype(x.dtype)
    X = x.reshape(-1, spec.d_in).to(cd)
    G = grad.reshape(-1, spec.d_out).to(cd)
    W1, b1 = leaf_w1.to(cd), leaf_b1.to(cd)
    W2 = None if ctx.linear else leaf_w2.to(cd)
    leaf = reference.route(spec, X).leaf[:, 0]
    gx = torch.zeros_like(X)
    gw1, gb1 = torch.zeros_like(W1), torch.zeros_like(b1)
    gw2 = None if ctx.linear else torch.zeros_like(W2)
    gb2 = None if ctx.linear else torch.zeros(spec.n_leaves, spec.d_out, dtype=cd, device=x.device)
    width = spec.leaf_width
    for rows in reference._chunks(X.shape[0], spec.d_in * width + width * spec.d_out):
        j, xr, gr = leaf[rows], X[rows], G[rows]
        pre = torch.bmm(xr.unsqueeze(1), W1[j]).squeeze(1) + b1[j]                     # (r, l)
        if ctx.linear:
            dh = gr
        else:
            h = activations.apply(ctx.activation, pre)
            gw2.view(spec.n_leaves, -1).index_add_(0, j, (h.unsqueeze(2) * gr.unsqueeze(1)).flatten(1))
            gb2.index_add_(0, j, gr)
            dh = torch.bmm(gr.unsqueeze(1), W2[j].transpose(1, 2)).squeeze(1)
        da = dh * activations.derivative(ctx.activation, pre)
        gw1.view(spec.n_leaves, -1).index_add_(0, j, (xr.unsqueeze(2) * da.unsqueeze(1)).flatten(1))
        gb1.index_add_(0, j, da)
        gx[rows] = torch.bmm(da.unsqueeze(1), W1[j].transpose(1, 2)).squeeze(1)
    cast = lambda t, like: None if t is None else t.to(like.dtype)
    return (gx.to(x.dtype).reshape(x.shape), torch.zeros_like(node_weight), torch.zeros_like(node_bias),
            cast(gw1, leaf_w1), cast(gb1, leaf_b1), cast(gw2, leaf_w2), cast(gb2, leaf_b2), None, None)


leaf_mlp_tree.register_autograd(_leaf_mlp_backward, setup_context=_leaf_mlp_setup)


# ----------------------------------------------------------------------------- form B

@torch.library.custom_op("fffcompile::neuron_tree", mutates_args=())
def neuron_tree(x: Tensor, node_weight: Tensor, node_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
                activation: str, tie: str) -> Tensor:
    spec = spec_from_neuron_tree_args(node_weight, node_bias, out_weight, out_bias, activation, tie)
    return reference.hard(spec, x)


@neuron_tree.register_fake
def _(x, node_weight, node_bias, out_weight, out_bias, activation, tie):
    return x.new_empty(*x.shape[:-1], out_weight.shape[-1])


def _neuron_setup(ctx, inputs, output):
    x, node_weight, node_bias, out_weight, out_bias, activation, tie = inputs
    ctx.activation, ctx.tie = activation, tie
    ctx.save_for_backward(x, node_weight, node_bias, out_weight, out_bias)


def _neuron_backward(ctx, grad):
    x, node_weight, node_bias, out_weight, out_bias = ctx.saved_tensors
    spec = spec_from_neuron_tree_args(node_weight, node_bias, out_weight, out_bias, ctx.activation, ctx.tie)
    cd = reference.compute_dtype(x.dtype)
    X = x.reshape(-1, spec.d_in).to(cd)
    G = grad.reshape(-1, spec.d_out).to(cd)
    W, b, V = node_weight.to(cd), node_bias.to(cd), out_weight.to(cd)
    gw, gb, gv = torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(V)
    gx = torch.zeros_like(X)
    trees, n = spec.trees, spec.nodes_per_tree
    flat = lambda t: t.view(trees * n, -1)
    offset = (torch.arange(trees, device=x.device) * n).unsqueeze(0)
    for nodes in reference.route(spec, X).nodes.unbind(-1):                           # (R, P) per level
        idx = nodes + offset                                                           # flat neuron index
        w, v = flat(W)[idx], flat(V)[idx]                                              # (R, P, d)
        a = torch.einsum("rd,rpd->rp", X, w) + b.view(-1)[idx]
        flat(gv).index_add_(0, idx.flatten(), (activations.apply(ctx.activation, a).unsqueeze(-1) * G.unsqueeze(1)).flatten(0, 1))
        da = torch.einsum("ro,rpo->rp", G, v) * activations.derivative(ctx.activation, a)
        flat(gw).index_add_(0, idx.flatten(), (da.unsqueeze(-1) * X.unsqueeze(1)).flatten(0, 1))
        gb.view(-1).index_add_(0, idx.flatten(), da.flatten())
        gx += torch.einsum("rp,rpd->rd", da, w)
    return (gx.to(x.dtype).reshape(x.shape), gw.to(node_weight.dtype), gb.to(node_bias.dtype),
            gv.to(out_weight.dtype), G.sum(0).to(out_bias.dtype), None, None)


neuron_tree.register_autograd(_neuron_backward, setup_context=_neuron_setup)


# ----------------------------------------------------------------------------- spec-level entry

def op_arguments(spec: FFFSpec) -> tuple:
    """The tensor and attribute arguments of the op that runs ``spec``'s tree (not its master leaf)."""
    if spec.form == "leaf_mlp":
        return (spec.node_weight, spec.node_bias, spec.leaf_w1, spec.leaf_b1, spec.leaf_w2, spec.leaf_b2,
                spec.activation, spec.tie)
    return (spec.node_weight, spec.node_bias, spec.out_weight, spec.out_bias, spec.activation, spec.tie)


def op_for(spec: FFFSpec):
    """The op overload that runs ``spec``'s form."""
    return torch.ops.fffcompile.leaf_mlp_tree.default if spec.form == "leaf_mlp" else torch.ops.fffcompile.neuron_tree.default


def run_tree(spec: FFFSpec, x: Tensor) -> Tensor:
    """Run the fused op for ``spec``'s tree part on x (..., d_in)."""
    return op_for(spec)(x, *op_arguments(spec))
