"""ONNX files exported from torch FFF layers and look-alikes by both torch exporters, cached per test session.

``exported(name, exporter)`` returns the path of ``CASES[name]`` exported with ``exporter``
("dynamo": ``torch.onnx.export(dynamo=True)``, opset 18; "legacy": the TorchScript exporter in
training-preserving mode, opset 17), dynamic leading dims; each file is written once per
session into a temporary directory. ``case(name)`` gives the module (seeded) and its input.

Every case states how many fffcompile nodes a rewrite must produce (0 for look-alikes) and,
where the layer's own parameters define it, the true FFFSpec (``true_spec``), so that tests
compare against ``reference.hard`` of a spec that was never extracted.
"""
from __future__ import annotations

import atexit
import functools
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import onnx
import torch
from torch import nn

from fffcompile.nn import FFF, NeuronTree
from fffcompile.spec import FFFSpec
from third_party import DenseLookAlike, ModuleListTree, SoftTreeMixture, TinyTransformer, UltraFastBERTFFF


class UnrolledFFF(nn.Module):
    """The fastfeedforward 0.2.1 ``training_forward`` with an int depth: per-level slices, sigmoid, 1 - p,
    cat/flatten into the mixture, one matmul for every leaf's first layer, a Python loop writing each leaf's
    output into an ``empty`` buffer, then mixture-weighted sum."""

    def __init__(self, d_in, leaf, d_out, depth):
        super().__init__()
        self.depth, self.leaf, self.d_out = depth, leaf, d_out
        n, L = 2 ** depth - 1, 2 ** depth
        self.node_weights = nn.Parameter(torch.randn(n, d_in) / math.sqrt(d_in))
        self.node_biases = nn.Parameter(torch.randn(n, 1) * 0.1)
        self.w1s = nn.Parameter(torch.randn(L, d_in, leaf) / math.sqrt(d_in))
        self.b1s = nn.Parameter(torch.randn(L, leaf) * 0.1)
        self.w2s = nn.Parameter(torch.randn(L, leaf, d_out) / math.sqrt(leaf))
        self.b2s = nn.Parameter(torch.randn(L, d_out) * 0.1)

    def forward(self, x):
        B, L = x.shape[0], 2 ** self.depth
        mixture = torch.ones((B, L), dtype=torch.float, device=x.device)
        for level in range(self.depth):
            start, end = 2 ** level - 1, 2 ** (level + 1) - 1
            p = torch.sigmoid(torch.matmul(x, self.node_weights[start:end].T) + self.node_biases[start:end].T)
            pairs = torch.cat([(1 - p).unsqueeze(-1), p.unsqueeze(-1)], dim=-1).flatten(-2).unsqueeze(-1)
            mixture = (mixture.view(B, 2 ** (level + 1), L // 2 ** (level + 1)) * pairs).flatten(1)
        h = torch.matmul(x, self.w1s.transpose(0, 1).flatten(1, 2)).view(B, L, self.leaf) + self.b1s
        h = torch.relu(h)
        out = torch.empty((B, L, self.d_out), dtype=torch.float, device=x.device)
        for i in range(L):
            out[:, i] = torch.matmul(h[:, i], self.w2s[i]) + self.b2s[i]
        return (out * mixture.unsqueeze(-1)).sum(1)


class LinearLeafTree(nn.Module):
    """A soft tree whose leaves are single linear layers: y = sum_j mu_j(x) (x W_j + b_j) (LeafLinearTree)."""

    def __init__(self, d_in, d_out, depth):
        super().__init__()
        self.depth = depth
        self.nodes = nn.Linear(d_in, 2 ** depth - 1)
        self.w = nn.Parameter(torch.randn(2 ** depth, d_in, d_out) / math.sqrt(d_in))
        self.b = nn.Parameter(torch.randn(2 ** depth, d_out) * 0.1)

    def forward(self, x):
        p = torch.sigmoid(self.nodes(x))
        mu = torch.ones_like(p[:, :1])
        for level in range(self.depth):
            pl = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
            mu = torch.stack((mu * (1 - pl), mu * pl), -1).flatten(1)
        y = torch.einsum("bl,blo->bo", mu, torch.einsum("bd,ldo->blo", x, self.w) + self.b)
        return y + p.mean(-1, keepdim=True) if getattr(self, "leak_router", False) else y


class SharedProducer(LinearLeafTree):
    """A look-alike: the router probabilities are also read outside the tree (y + mean(p)); no rewrite may
    remove them."""

    leak_router = True


class SharedInput(nn.Module):
    """An FFF whose input also feeds a parallel linear branch: the FFF is rewritten, the branch stays."""

    def __init__(self, d):
        super().__init__()
        self.fff, self.skip = FFF(d, d, 2, 3), nn.Linear(d, d)

    def forward(self, x):
        return self.fff(x) + self.skip(x)


class TwoOnOneInput(nn.Module):
    """Two FFFs routing the same input, summed: their router sigmoids share X, so detection groups them at first."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = FFF(d, d, 2, 3), FFF(d, d, 3, 2, activation="gelu")

    def forward(self, x):
        return self.a(x) + self.b(x)


class TwoOutputsOneInput(TwoOnOneInput):
    """The same two FFFs with separate outputs (they never meet downstream)."""

    def forward(self, x):
        return self.a(x), self.b(x)


def _spec_linear_leaves(m: LinearLeafTree) -> FFFSpec:
    return FFFSpec(form="leaf_mlp", depth=m.depth, activation="identity", node_weight=m.nodes.weight.detach(),
                   node_bias=m.nodes.bias.detach(), leaf_w1=m.w.detach(), leaf_b1=m.b.detach(), tie="ge")


class HardTree(nn.Module):
    """A leaf-MLP tree written as its hard descent with gathers (as an inference-only port would be):
    every node's logit, the current node's picked per level, >= 0, index arithmetic, the leaf's
    weights gathered from stacked tables."""

    def __init__(self, d_in, d_out, depth, width, activation="gelu"):
        super().__init__()
        self.fff = FFF(d_in, d_out, depth, width, activation=activation)

    def forward(self, x):
        f = self.fff
        z = x @ f.node_weight.T + f.node_bias
        node = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        for _ in range(f.depth):
            node = 2 * node + 1 + (z.gather(1, node) >= 0).long()
        leaf = node[:, 0] - (2 ** f.depth - 1)
        h = torch.einsum("bd,bdh->bh", x, f.leaf_w1[leaf]) + f.leaf_b1[leaf]
        h = torch.nn.functional.gelu(h) if f.activation == "gelu" else torch.relu(h)
        return torch.einsum("bh,bho->bo", h, f.leaf_w2[leaf]) + f.leaf_b2[leaf]


class GatheredNeuronTree(nn.Module):
    """Form B as an inference port writes it: per level, the current node's weight row and bias gathered
    (index_select) and dotted with x (bmm), > 0 steps the index; the path's output rows gathered at the end
    and mixed by one bmm. The other nodes are never computed."""

    def __init__(self, d_in, d_out, depth):
        super().__init__()
        self.depth, n = depth, 2 ** (depth + 1) - 1
        self.w_in = nn.Parameter(torch.randn(n, d_in) / d_in ** 0.5)
        self.b_in = nn.Parameter(0.1 * torch.randn(n))
        self.w_out = nn.Parameter(torch.randn(n, d_out) / (depth + 1) ** 0.5)
        self.b_out = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        node = torch.zeros(flat.shape[0], dtype=torch.long, device=x.device)
        nodes, logits = [], []
        for _ in range(self.depth + 1):
            z = torch.bmm(flat.unsqueeze(1), self.w_in.index_select(0, node).unsqueeze(-1))[:, 0, 0] \
                + self.b_in.index_select(0, node)
            nodes.append(node)
            logits.append(z)
            node = 2 * node + 1 + (z > 0).long()
        rows = self.w_out.index_select(0, torch.stack(nodes, 1).flatten()).view(flat.shape[0], self.depth + 1, -1)
        y = torch.bmm(torch.relu(torch.stack(logits, 1)).unsqueeze(1), rows)[:, 0] + self.b_out
        return y.reshape(*x.shape[:-1], -1)


class GatheredLeafTree(nn.Module):
    """Form A written as its hard descent that gathers only the current node's row per level (x . W[n] + b[n]
    >= 0), then the reached leaf's MLP from stacked tables."""

    def __init__(self, d_in, d_out, depth, width):
        super().__init__()
        self.fff = FFF(d_in, d_out, depth, width, activation="silu")

    def forward(self, x):
        f = self.fff
        node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(f.depth):
            z = (x * f.node_weight[node]).sum(-1) + f.node_bias[node]
            node = 2 * node + 1 + (z >= 0).long()
        leaf = node - (2 ** f.depth - 1)
        h = torch.nn.functional.silu(torch.einsum("bd,bdh->bh", x, f.leaf_w1[leaf]) + f.leaf_b1[leaf])
        return torch.einsum("bh,bho->bo", h, f.leaf_w2[leaf]) + f.leaf_b2[leaf]


class FlatTableDescent(nn.Module):
    """Form A as a hard descent with ``index_select`` per level (x * W[n] summed, + b[n], >= 0), whose leaf
    weights are stored flat, one row per leaf ((L, d_in * l) and (L, l * d_out)), gathered and viewed per row
    before a bmm: the leaf tables are 2-D, their layout only visible through the numbers."""

    def __init__(self, d_in, d_out, depth, width):
        super().__init__()
        self.depth, self.width, self.d_out = depth, width, d_out
        n, L = 2 ** depth - 1, 2 ** depth
        self.W = nn.Parameter(torch.randn(n, d_in) / math.sqrt(d_in))
        self.b = nn.Parameter(torch.randn(n) * 0.3)
        self.w1 = nn.Parameter(torch.randn(L, d_in * width) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.randn(L, width) * 0.1)
        self.w2 = nn.Parameter(torch.randn(L, width * d_out) / math.sqrt(width))
        self.b2 = nn.Parameter(torch.randn(L, d_out) * 0.1)

    def forward(self, x):
        B, d = x.shape
        node = torch.zeros(B, dtype=torch.long)
        for _ in range(self.depth):
            z = (x * torch.index_select(self.W, 0, node)).sum(-1) + torch.index_select(self.b, 0, node)
            node = 2 * node + 1 + (z >= 0).long()
        leaf = node - (2 ** self.depth - 1)
        w1 = torch.index_select(self.w1, 0, leaf).view(B, d, self.width)
        h = torch.nn.functional.gelu(torch.bmm(x.unsqueeze(1), w1).squeeze(1) + torch.index_select(self.b1, 0, leaf))
        w2 = torch.index_select(self.w2, 0, leaf).view(B, self.width, self.d_out)
        return torch.bmm(h.unsqueeze(1), w2).squeeze(1) + torch.index_select(self.b2, 0, leaf)


def _spec_flat_table(m: FlatTableDescent) -> FFFSpec:
    L = 2 ** m.depth
    return FFFSpec(form="leaf_mlp", depth=m.depth, activation="gelu", node_weight=m.W.detach(), node_bias=m.b.detach(),
                   leaf_w1=m.w1.detach().view(L, -1, m.width), leaf_b1=m.b1.detach(),
                   leaf_w2=m.w2.detach().view(L, m.width, m.d_out), leaf_b2=m.b2.detach(), tie="ge", source="hard")


class GatheredTrees(nn.Module):
    """Form B with P trees as an inference port writes it: the trees' weight rows in one flat tree-major (P n, d)
    table, per level rows p n + node gathered for every tree at once and dotted with x, > 0 steps; output rows
    gathered from a (P n, d_out) table, GELU, an output bias."""

    def __init__(self, d_in, d_out, depth, trees):
        super().__init__()
        self.depth, self.trees, self.n = depth, trees, 2 ** (depth + 1) - 1
        self.w_in = nn.Parameter(torch.randn(trees * self.n, d_in) / math.sqrt(d_in))
        self.b_in = nn.Parameter(torch.randn(trees * self.n) * 0.1)
        self.w_out = nn.Parameter(torch.randn(trees * self.n, d_out) / math.sqrt(depth + 1))
        self.b_out = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        base = (torch.arange(self.trees) * self.n).unsqueeze(0)
        node = torch.zeros(x.shape[0], self.trees, dtype=torch.long)
        y = self.b_out.expand(x.shape[0], -1)
        for _ in range(self.depth + 1):
            rows = base + node
            z = (x.unsqueeze(1) * self.w_in[rows]).sum(-1) + self.b_in[rows]
            y = y + (torch.nn.functional.gelu(z).unsqueeze(-1) * self.w_out[rows]).sum(1)
            node = 2 * node + 1 + (z > 0).long()
        return y


def _spec_gathered_trees(m: GatheredTrees) -> FFFSpec:
    P, n = m.trees, m.n
    return FFFSpec(form="neuron_tree", depth=m.depth, activation="gelu", node_weight=m.w_in.detach().view(P, n, -1),
                   node_bias=m.b_in.detach().view(P, n), out_weight=m.w_out.detach().view(P, n, -1),
                   out_bias=m.b_out.detach(), tie="gt", source="hard")


class OneHotPick(nn.Module):
    """A hard form A tree over all node logits (gather per level, ``where(z >= 0, 2n + 2, 2n + 1)``) that runs every
    leaf (einsum, SiLU) and keeps the reached one by a one-hot product and a sum (no gather of leaf outputs). Its
    float16 dynamo export ends in a float32 value."""

    def __init__(self, d_in, d_out, depth, width):
        super().__init__()
        self.fff = FFF(d_in, d_out, depth, width, activation="silu")

    def forward(self, x):
        f = self.fff
        z = torch.nn.functional.linear(x, f.node_weight, f.node_bias)
        node = torch.zeros_like(z[:, :1], dtype=torch.long)
        for _ in range(f.depth):
            node = torch.where(z.gather(1, node) >= 0, 2 * node + 2, 2 * node + 1)
        pick = torch.nn.functional.one_hot(node[:, 0] - (2 ** f.depth - 1), 2 ** f.depth).to(x.dtype)
        h = torch.nn.functional.silu(torch.einsum("bd,ldh->blh", x, f.leaf_w1) + f.leaf_b1)
        return (pick.unsqueeze(-1) * (torch.einsum("blh,lho->blo", h, f.leaf_w2) + f.leaf_b2)).sum(1)


class PerLevelBmmTree(nn.Module):
    """A soft leaf-MLP tree whose mixture is built level by level (per-level router slices, the running path
    weights viewed as (B, 2^(k+1), L / 2^(k+1)) and multiplied by the interleaved (1 - p, p)) and whose leaves
    run as a bmm over a leaf-major expanded input (L, B, d), transposed back. In eval mode: its hard descent.

    Every prefix of its levels is itself a tree "with sigmoid leaves" (the next level's 1 - p, p), so a
    frontend may rewrite the whole tree or nothing, never a part (the rest would stay soft)."""

    def __init__(self, d, depth=3, width=4):
        super().__init__()
        self.depth, L = depth, 2 ** depth
        self.nw = nn.Parameter(torch.randn(L - 1, d) / math.sqrt(d))
        self.nb = nn.Parameter(torch.randn(L - 1) * 0.1)
        self.w1 = nn.Parameter(torch.randn(L, d, width) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.randn(L, 1, width) * 0.1)
        self.w2 = nn.Parameter(torch.randn(L, width, d) / math.sqrt(width))
        self.b2 = nn.Parameter(torch.randn(L, 1, d) * 0.1)

    def _leaves(self, x):                           # (B, L, d)
        xs = x.unsqueeze(0).expand(2 ** self.depth, -1, -1)
        return (torch.bmm(torch.relu(torch.bmm(xs, self.w1) + self.b1), self.w2) + self.b2).transpose(0, 1)

    def forward(self, x):
        B, L = x.shape[0], 2 ** self.depth
        if not self.training:
            node = torch.zeros(B, dtype=torch.long)
            for _ in range(self.depth):
                z = (x * self.nw[node]).sum(-1) + self.nb[node]
                node = 2 * node + 1 + (z >= 0).long()
            return self._leaves(x)[torch.arange(B), node - (L - 1)]
        mix = x.new_ones(B, L)
        for k in range(self.depth):
            lo, hi = 2 ** k - 1, 2 ** (k + 1) - 1
            p = torch.sigmoid(x @ self.nw[lo:hi].t() + self.nb[lo:hi])
            pairs = torch.stack([1 - p, p], -1).flatten(1).unsqueeze(-1)
            mix = (mix.view(B, 2 ** (k + 1), L // 2 ** (k + 1)) * pairs).reshape(B, L)
        return (mix.unsqueeze(-1) * self._leaves(x)).sum(1)


def _spec_per_level_bmm(m: PerLevelBmmTree) -> FFFSpec:
    return FFFSpec(form="leaf_mlp", depth=m.depth, activation="relu", node_weight=m.nw.detach(), node_bias=m.nb.detach(),
                   leaf_w1=m.w1.detach(), leaf_b1=m.b1.detach()[:, 0], leaf_w2=m.w2.detach(), leaf_b2=m.b2.detach()[:, 0],
                   tie="ge")


class LeafMajorMaster(nn.Module):
    """Form C around a leaf-major tree: y = s(k) tree(x) + (1 - s(k)) master(x), the master a dense GELU MLP of
    width 8 and k a learned scalar; in eval mode the tree descends (its own hard forward), the master and the
    blend stay dense."""

    def __init__(self, d, depth=3, width=4, master=8):
        super().__init__()
        self.depth = depth
        self.tree = PerLevelBmmTree(d, depth, width)
        self.m1, self.m2 = nn.Linear(d, master), nn.Linear(master, d)
        self.k = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        s = torch.sigmoid(self.k)
        return s * self.tree(x) + (1 - s) * self.m2(torch.nn.functional.gelu(self.m1(x)))


def _gallery(style: str, **spec_args) -> nn.Module:
    """A ``graph_gallery`` style built from a ``make_spec`` spec; the spec rides along as ``true_spec``."""
    import graph_gallery
    from specs import make_spec
    spec = make_spec(**spec_args)
    module = getattr(graph_gallery, style)(spec)
    module.true_spec = spec
    return module


class ScatterMaskTrees(nn.Module):
    """UltraFastBERT-style neuron trees, P of them: decisions on the logits viewed as (B, P, n), each tree's path
    marked by ``scatter_`` into a zero (B, P, n) mask, y = (gelu(a) * mask) W_out (no bias)."""

    def __init__(self, d_in, d_out, depth=2, trees=2):
        super().__init__()
        self.depth, self.trees, self.n = depth, trees, 2 ** (depth + 1) - 1
        self.linear_in = nn.Linear(d_in, trees * self.n)
        self.linear_out = nn.Linear(trees * self.n, d_out, bias=False)

    def forward(self, x):
        B = x.shape[0]
        a = self.linear_in(x)
        dec = (a.view(B, self.trees, self.n) > 0).long()
        node = torch.zeros(B, self.trees, dtype=torch.long)
        mask = torch.zeros(B, self.trees, self.n)
        for _ in range(self.depth + 1):
            mask.scatter_(2, node.unsqueeze(-1), 1.0)
            node = 2 * node + 1 + torch.gather(dec, 2, node.unsqueeze(-1)).squeeze(-1)
        return self.linear_out(torch.nn.functional.gelu(a) * mask.view(B, -1))


def _spec_scatter_trees(m: ScatterMaskTrees) -> FFFSpec:
    P, n = m.trees, m.n
    return FFFSpec(form="neuron_tree", depth=m.depth, activation="gelu",
                   node_weight=m.linear_in.weight.detach().reshape(P, n, -1), node_bias=m.linear_in.bias.detach().reshape(P, n),
                   out_weight=m.linear_out.weight.detach().T.reshape(P, n, -1),
                   out_bias=torch.zeros(m.linear_out.out_features), tie="gt", source="hard")


class LogSpaceTree(nn.Module):
    """A soft tree mixed in log space: mu_j = exp(sum_n |T_jn| log s(z_n T_jn)) with a signed path table T, linear
    leaves. A tree, but of no layout the frontend reads: left, with a reason."""

    def __init__(self, d, depth=3):
        super().__init__()
        L = 2 ** depth
        self.w = nn.Parameter(torch.randn(L - 1, d) / math.sqrt(d))
        self.leaf_w = nn.Parameter(torch.randn(L, d, d) / math.sqrt(d))
        paths = torch.zeros(L, L - 1)
        for j in range(L):
            n = 0
            for k in range(depth):
                bit = (j >> (depth - 1 - k)) & 1
                paths[j, n] = 1.0 if bit else -1.0
                n = 2 * n + 1 + bit
        self.register_buffer("paths", paths)

    def forward(self, x):
        z = x @ self.w.t()
        mu = (torch.log(torch.sigmoid(z.unsqueeze(-2) * self.paths)) * self.paths.abs()).sum(-1).exp()
        return (mu.unsqueeze(-1) * torch.einsum("bd,ldo->blo", x, self.leaf_w)).sum(-2)


class SignedPathTree(nn.Module):
    """A soft tree through a signed path table: mu_j = prod_k s(S_jk z[n_jk]) with the node ids n_jk of leaf j's path
    and S_jk = +1 where it goes right, -1 where it goes left (s(-z) = 1 - s(z)); single linear leaves.
    ``swapped``: level 1's signs flipped (a look-alike: children swapped there, confirmation refuses it)."""

    def __init__(self, d_in, d_out, depth=3, swapped=False):
        super().__init__()
        self.depth, L = depth, 2 ** depth
        self.router = nn.Linear(d_in, L - 1)
        self.w = nn.Parameter(torch.randn(L, d_in, d_out) / math.sqrt(d_in))
        self.b = nn.Parameter(torch.randn(L, d_out) * 0.1)
        nodes, sign = torch.zeros(L, depth, dtype=torch.long), torch.zeros(L, depth)
        for j in range(L):
            n = 0
            for k in range(depth):
                bit = (j >> (depth - 1 - k)) & 1
                nodes[j, k], sign[j, k] = n, (1.0 if bit else -1.0) * (-1.0 if swapped and k == 1 else 1.0)
                n = 2 * n + 1 + bit
        self.register_buffer("nodes", nodes)
        self.register_buffer("sign", sign)

    def forward(self, x):
        mu = torch.sigmoid(self.router(x)[..., self.nodes] * self.sign).prod(-1)
        return torch.einsum("...l,...lo->...o", mu, torch.einsum("...d,ldo->...lo", x, self.w) + self.b)


def _spec_signed_path(m: SignedPathTree) -> FFFSpec:
    return FFFSpec(form="leaf_mlp", depth=m.depth, activation="identity", node_weight=m.router.weight.detach(),
                   node_bias=m.router.bias.detach(), leaf_w1=m.w.detach(), leaf_b1=m.b.detach(), tie="ge")


def _level1_swapped(module: nn.Module) -> nn.Module:
    """A path-matrix tree with level 1's R and Lm rows exchanged: its children swapped there, a look-alike."""
    with torch.no_grad():
        R, Lm = module.R.clone(), module.Lm.clone()
        module.R[1:3], module.Lm[1:3] = Lm[1:3], R[1:3]
    del module.true_spec
    return module


def _path_matrix(swapped: bool) -> nn.Module:
    """A log-space tree with fixed 0/1 path matrices, mu = exp(log s(z) R + log s(-z) Lm) (a product with zeros:
    hardened, log 0 = -inf must not turn it into NaN); ``swapped``: level 1's children swapped (a look-alike
    that confirmation must refuse)."""
    module = _gallery("PathMatrix", depth=3, d_in=8, d_out=5, activation="silu", seed=2)
    return _level1_swapped(module) if swapped else module


def _softplus_softmax(swapped: bool) -> nn.Module:
    """Leaves scored in log space with softplus, mu = softmax(-softplus(-z) R - softplus(z) Lm) (read as
    log-sigmoids); ``swapped``: level 1's children swapped (a look-alike, left untouched)."""
    module = _gallery("SoftplusSoftmax", depth=2, d_in=8, d_out=5, activation="gelu", seed=3)
    return _level1_swapped(module) if swapped else module


class SoftplusMLP(nn.Module):
    """A dense MLP with a softplus activation: a softplus of a projection and no tree (untouched)."""

    def __init__(self, d, width=7):
        super().__init__()
        self.up, self.down = nn.Linear(d, width), nn.Linear(width, d)

    def forward(self, x):
        return self.down(torch.nn.functional.softplus(self.up(x)) - torch.nn.functional.softplus(-self.up(x)))


class SigmoidLeafMixture(SoftTreeMixture):
    """A soft tree mixture (third_party layout) whose leaves are sigmoid MLPs, or, ``gated``, whose leaves gate x by a
    sigmoid, y_j = (x * s(x W1_j + b1_j)) W2_j + b2_j (no leaf MLP: the sigmoid meets data before the second layer).
    Used as look-alikes: ``kind="swapped_children"`` (sigmoid leaves, one level's children swapped) and gated."""

    def __init__(self, d, kind="tree", gated=False):
        super().__init__(d, depth=3, hidden=d if gated else 6, kind=kind)
        self.gated = gated

    def _leaves(self, x):
        h = torch.sigmoid(torch.einsum("bd,ldh->blh", x, self.experts_in) + self.experts_in_bias)
        if self.gated:
            h = x.unsqueeze(1) * h
        return torch.einsum("blh,lho->blo", h, self.experts_out) + self.experts_out_bias


class GatedFFF(nn.Module):
    """An FFF whose output is multiplied by a soft gate on the same input, y = FFF(x) * s(x G + g): the gate
    could be one more level of a mixture, so the FFF is left (conservatively) with its reason."""

    def __init__(self, d):
        super().__init__()
        self.fff, self.gate = FFF(d, d, 2, 3), nn.Linear(d, d)

    def forward(self, x):
        return self.fff(x) * torch.sigmoid(self.gate(x))


class GLU(nn.Module):
    """A gated linear unit: y = (x A + a) * s(x B + b), then a projection (a sigmoid of a projection, no tree)."""

    def __init__(self, d, width=7):
        super().__init__()
        self.value, self.gate, self.out = nn.Linear(d, width), nn.Linear(d, width), nn.Linear(width, d)

    def forward(self, x):
        return self.out(self.value(x) * torch.sigmoid(self.gate(x)))


class TemperatureTree(nn.Module):
    """A soft leaf tree whose routers have a temperature, p = s((x W + b) / T), written with a constant T or, ``learned``,
    as s(k (x W + b)) with a scalar Parameter k (negative here: every decision mirrored). Hardened it decides on the
    sign of the scaled logit, so its spec's routers are W / T, b / T (k W, k b)."""

    def __init__(self, d, d_out, depth, width, scale, learned=False):
        super().__init__()
        self.fff = FFF(d, d_out, depth, width)
        self.depth, self.learned = depth, learned
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learned else float(scale)

    def forward(self, x):
        fff, lead = self.fff, x.shape[:-1]
        X = x.reshape(-1, x.shape[-1])
        z = X @ fff.node_weight.T + fff.node_bias
        p = torch.sigmoid(z * self.scale if self.learned else z / self.scale)
        mu = torch.ones_like(z[:, :1])
        for level in range(self.depth):
            p_level = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
            mu = torch.stack((mu * (1 - p_level), mu * p_level), -1).flatten(1)
        h = torch.relu(torch.einsum("bd,ldh->blh", X, fff.leaf_w1) + fff.leaf_b1)
        y = torch.einsum("bl,blo->bo", mu, torch.einsum("blh,lho->blo", h, fff.leaf_w2) + fff.leaf_b2)
        return y.reshape(*lead, -1)

    def true_spec(self) -> FFFSpec:
        k = float(self.scale.detach()) if self.learned else 1.0 / self.scale
        spec = _spec_fff(self.fff)
        return spec.replace(node_weight=spec.node_weight * k, node_bias=spec.node_bias * k)


class QuickGeluMLP(nn.Module):
    """A dense MLP with QuickGELU, a s(1.702 a): a sigmoid of a scaled projection whose input is read with it (an
    activation, no router; untouched)."""

    def __init__(self, d, width=7):
        super().__init__()
        self.up, self.down = nn.Linear(d, width), nn.Linear(width, d)

    def forward(self, x):
        a = self.up(x)
        return self.down(a * torch.sigmoid(1.702 * a))


def _spec_fff(m: FFF) -> FFFSpec:
    return FFFSpec(form="leaf_mlp", depth=m.depth, activation=m.activation, node_weight=m.node_weight.detach(),
                   node_bias=m.node_bias.detach(), leaf_w1=m.leaf_w1.detach(), leaf_b1=m.leaf_b1.detach(),
                   leaf_w2=m.leaf_w2.detach(), leaf_b2=m.leaf_b2.detach(), tie="ge")


def _spec_unrolled(m: UnrolledFFF) -> FFFSpec:
    return FFFSpec(form="leaf_mlp", depth=m.depth, activation="relu", node_weight=m.node_weights.detach(),
                   node_bias=m.node_biases.detach()[:, 0], leaf_w1=m.w1s.detach(), leaf_b1=m.b1s.detach(),
                   leaf_w2=m.w2s.detach(), leaf_b2=m.b2s.detach(), tie="ge")


def _fastfeedforward(d_in, leaf, d_out, depth):
    from fastfeedforward import FFF as ShippedFFF
    return ShippedFFF(d_in, leaf, d_out, depth)


def _spec_fastfeedforward(m) -> FFFSpec:
    return FFFSpec(form="leaf_mlp", depth=int(m.depth.item()), activation="relu", node_weight=m.node_weights.detach(),
                   node_bias=m.node_biases.detach()[:, 0], leaf_w1=m.w1s.detach(), leaf_b1=m.b1s.detach(),
                   leaf_w2=m.w2s.detach(), leaf_b2=m.b2s.detach(), tie="ge")


def _spec_ufb(m: UltraFastBERTFFF) -> FFFSpec:
    P, n, d = m.parallel_size, m.n_nodes, m.input_width
    return FFFSpec(form="neuron_tree", depth=m.depth, activation="gelu",
                   node_weight=m.linear_in.weight.detach().reshape(P, n, d),
                   node_bias=m.linear_in.bias.detach().reshape(P, n),
                   out_weight=m.linear_out.weight.detach().T.reshape(P, n, m.output_width),
                   out_bias=torch.zeros(m.output_width), tie="gt", source="hard")


def _spec_gathered_neuron_tree(m: GatheredNeuronTree) -> FFFSpec:
    return FFFSpec(form="neuron_tree", depth=m.depth, activation="relu", node_weight=m.w_in.detach()[None],
                   node_bias=m.b_in.detach()[None], out_weight=m.w_out.detach()[None], out_bias=m.b_out.detach(),
                   tie="gt", source="hard")


def _spec_neuron_tree(m: NeuronTree) -> FFFSpec:
    return FFFSpec(form="neuron_tree", depth=m.depth, activation=m.activation, node_weight=m.in_weight.detach(),
                   node_bias=m.in_bias.detach(), out_weight=m.out_weight.detach(), out_bias=m.out_bias.detach(),
                   tie=m.tie, source="hard")


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]          # the exported example; tests run other sizes
    fff_nodes: int                        # fffcompile nodes a rewrite must produce
    true_spec: Optional[Callable] = None  # module -> FFFSpec, for single-layer cases
    exporters: tuple[str, ...] = ("dynamo", "legacy")
    all_or_nothing: bool = False          # rewritten whole (fff_nodes) or not at all, never in part


CASES: dict[str, Case] = {
    "fff": Case(lambda: FFF(12, 7, 3, 5, activation="gelu"), (4, 12), 1, _spec_fff),
    "fff_seq": Case(lambda: FFF(8, 6, 2, 4), (2, 5, 8), 1, _spec_fff),
    "fff_master": Case(lambda: FFF(10, 6, 3, 4, master_width=8), (4, 10), 1),
    # the shipped package: its int64 ``depth`` Parameter defeats the dynamo exporter (CAPTURE.md)
    "fastfeedforward": Case(lambda: _fastfeedforward(10, 3, 6, 3), (4, 10), 1, _spec_fastfeedforward,
                            exporters=("legacy",)),
    "unrolled": Case(lambda: UnrolledFFF(10, 3, 6, 3), (4, 10), 1, _spec_unrolled),
    "ultrafastbert": Case(lambda: UltraFastBERTFFF(12, 10, 3, 2), (2, 5, 12), 1, _spec_ufb),
    "neuron_tree": Case(lambda: NeuronTree(9, 5, 2, trees=3), (4, 9), 1, _spec_neuron_tree),
    "hard_tree": Case(lambda: HardTree(9, 5, 3, 4), (4, 9), 1, lambda m: _spec_fff(m.fff)),
    "gathered_neuron_tree": Case(lambda: GatheredNeuronTree(10, 6, 3), (2, 5, 10), 1, _spec_gathered_neuron_tree),
    "gathered_leaf_tree": Case(lambda: GatheredLeafTree(9, 5, 3, 4), (4, 9), 1, lambda m: _spec_fff(m.fff)),
    "flat_table_descent": Case(lambda: FlatTableDescent(9, 5, 3, 4), (4, 9), 1, _spec_flat_table),
    "signed_path": Case(lambda: SignedPathTree(8, 5), (4, 8), 1, _spec_signed_path),
    "path_matrix": Case(lambda: _path_matrix(False), (4, 8), 1, lambda m: m.true_spec),
    "softplus_softmax": Case(lambda: _softplus_softmax(False), (4, 8), 1, lambda m: m.true_spec),
    "gathered_trees": Case(lambda: GatheredTrees(8, 5, 2, 2), (4, 8), 1, _spec_gathered_trees),
    "one_hot_pick": Case(lambda: OneHotPick(8, 5, 3, 3), (4, 8), 1, lambda m: _spec_fff(m.fff)),
    "linear_leaves": Case(lambda: LinearLeafTree(7, 4, 3), (4, 7), 1, _spec_linear_leaves),
    "module_list": Case(lambda: ModuleListTree(8, 5, depth=2), (4, 8), 1),
    "soft_tree": Case(lambda: SoftTreeMixture(8, depth=3), (4, 8), 1),
    # the legacy exporter bakes attention's shapes in: a transformer only by the dynamo exporter
    "transformer": Case(lambda: TinyTransformer(8, [FFF(8, 8, 2, 4), UltraFastBERTFFF(8, 8, 2, 2)]), (2, 5, 8), 2,
                        exporters=("dynamo",)),
    "stack": Case(lambda: nn.Sequential(nn.Linear(8, 8), FFF(8, 8, 2, 4), nn.LayerNorm(8), UltraFastBERTFFF(8, 8, 2, 2),
                                        nn.GELU(), FFF(8, 3, 3, 2, activation="silu")), (2, 5, 8), 3),
    "shared_input": Case(lambda: SharedInput(6), (4, 6), 1),
    "two_on_one_input": Case(lambda: TwoOnOneInput(6), (4, 6), 2),
    "two_outputs_one_input": Case(lambda: TwoOutputsOneInput(6), (4, 6), 2, exporters=("dynamo",)),
    "scatter_trees": Case(lambda: ScatterMaskTrees(10, 6), (4, 10), 1, _spec_scatter_trees),
    "per_level_bmm": Case(lambda: PerLevelBmmTree(8), (4, 8), 1, all_or_nothing=True),
    "leaf_major_bmm": Case(lambda: PerLevelBmmTree(10, depth=4, width=3), (4, 10), 1, _spec_per_level_bmm),
    "leaf_major_master": Case(lambda: LeafMajorMaster(9), (4, 9), 1),
    # sigmoid leaf activations: the leaf sigmoids are no routers (only the routers are hardened)
    "fff_sigmoid": Case(lambda: FFF(12, 7, 3, 5, activation="sigmoid"), (4, 12), 1, _spec_fff),
    "fff_master_sigmoid": Case(lambda: FFF(10, 6, 3, 4, activation="sigmoid", master_width=8), (4, 10), 1),
    # router temperatures s(z / T), s(k z): a scalar scaling of the logit is read through
    "temperature": Case(lambda: TemperatureTree(9, 5, 3, 4, 0.5), (4, 9), 1, lambda m: m.true_spec()),
    "temperature_learned": Case(lambda: TemperatureTree(8, 6, 2, 3, -1.7, learned=True), (2, 3, 8), 1,
                                lambda m: m.true_spec()),
    "log_sigmoid_leaf_major": Case(lambda: _gallery("LogSigmoid", depth=3, d_in=8, d_out=5, seed=3), (4, 8), 1,
                                   lambda m: m.true_spec),
    # look-alikes: nothing to rewrite
    "shared_producer": Case(lambda: SharedProducer(7, 4, 3), (4, 7), 0),
    "softmax_moe": Case(lambda: SoftTreeMixture(8, kind="softmax_moe"), (4, 8), 0),
    "not_a_tree": Case(lambda: SoftTreeMixture(8, kind="not_a_tree"), (4, 8), 0),
    "swapped_children": Case(lambda: SoftTreeMixture(8, kind="swapped_children"), (4, 8), 0),
    "gated_residual": Case(lambda: SoftTreeMixture(8, kind="gated_residual"), (4, 8), 0),
    "signed_path_swapped": Case(lambda: SignedPathTree(8, 5, swapped=True), (4, 8), 0),
    "path_matrix_swapped": Case(lambda: _path_matrix(True), (4, 8), 0),
    "softplus_softmax_swapped": Case(lambda: _softplus_softmax(True), (4, 8), 0),
    "sigmoid_leaves_swapped": Case(lambda: SigmoidLeafMixture(8, kind="swapped_children"), (4, 8), 0),
    "sigmoid_gated_leaves": Case(lambda: SigmoidLeafMixture(8, gated=True), (4, 8), 0),
    "softplus_mlp": Case(lambda: SoftplusMLP(8), (4, 8), 0),
    "quick_gelu_mlp": Case(lambda: QuickGeluMLP(8), (4, 8), 0),
    "log_space_tree": Case(lambda: LogSpaceTree(8), (4, 8), 0),
    "gated_fff": Case(lambda: GatedFFF(6), (4, 6), 0),
    "glu": Case(lambda: GLU(8), (4, 8), 0),
    "dense_mlp": Case(lambda: DenseLookAlike(8, "mlp"), (4, 8), 0),
    "swiglu": Case(lambda: DenseLookAlike(8, "swiglu"), (4, 8), 0),
    "masked_wrong": Case(lambda: DenseLookAlike(8, "masked_wrong"), (4, 8), 0),
}


@functools.lru_cache(maxsize=None)
def case(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(sum(map(ord, name)))
    module = CASES[name].build().train()
    return module, torch.randn(*CASES[name].input_shape)


@functools.lru_cache(maxsize=None)
def _directory() -> str:
    path = tempfile.mkdtemp(prefix="fffcompile-onnx-")
    atexit.register(shutil.rmtree, path, True)
    return path


def export(module: nn.Module, x: torch.Tensor, path: str, exporter: str, opset: Optional[int] = None) -> str:
    dims = ["B", "S"][:x.dim() - 1]
    with torch.no_grad():
        y = module(x)
        out_rank = (y[0] if isinstance(y, tuple) else y).dim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = ({k: torch.export.Dim(n, min=1, max=4096) for k, n in enumerate(dims)},)
            torch.onnx.export(module, (x,), path, dynamo=True, dynamic_shapes=shapes, opset_version=opset or 18,
                              verbose=False)
        else:
            torch.onnx.export(module, (x,), path, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                              input_names=["x"], output_names=["y"], opset_version=opset or 17,
                              dynamic_axes={"x": dict(enumerate(dims)), "y": dict(enumerate(dims[:out_rank - 1]))})
    return path


@functools.lru_cache(maxsize=None)
def exported(name: str, exporter: str, opset: Optional[int] = None, external_data: bool = False) -> str:
    """The cached ONNX file of ``CASES[name]`` (with its weights in ``<file>.data`` for ``external_data``)."""
    module, x = case(name)
    tag = f"{name}.{exporter}.{opset or 'default'}{'.ext' if external_data else ''}"
    path = os.path.join(_directory(), f"{tag}.onnx")
    export(module, x, path, exporter, opset)
    if external_data:
        model = onnx.load(path)
        os.remove(path)
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{tag}.onnx.data", size_threshold=0)
    return path
