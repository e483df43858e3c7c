"""FFF layers written in many styles, by hand, for the graph frontend (test fixtures only).

Each builder takes an ``FFFSpec`` and returns a module computing that spec's training (soft)
form (form A) or its hard form (form B) in its own way, with its own parameter layout, so that
"capture -> extract == spec" can be checked. None of them is a layer the module frontend
knows by signature (run them with ``frontends=("graph",)`` to test the graph pass alone).

Form A styles: ``unrolled`` (the fastfeedforward package's training forward with a plain int
depth: per-level slices, cat/flatten, in-place ``mul_`` into views of a running mixture, leaves
written by ``copy_`` into a ``torch.empty`` buffer), ``leaf_major`` (leaves by ``bmm``
over x expanded to (L, rows, d): rows in the middle dim), ``table`` (all node logits in one Linear,
path products through an index table), ``logsigmoid`` (log-sigmoid sums through the table,
then ``exp``; leaves by ``bmm``), ``path_matrix`` (fixed 0/1 path matrices, batched matmul
leaves), ``linear_nobias`` (nodes without bias, single-linear leaves), ``threshold``
(per-node Linear(d, 1) routers with a learned threshold), ``master`` (form C: the tree blended
with an always-on master MLP by a learned logit), ``level_params`` (an nn.ParameterList of
per-level node weights, the mixture refined by an einsum outer product per level, leaves by
``baddbmm``), ``seq_leaves`` (one router Linear, each leaf's path found by the parent recurrence
from an ``arange`` of leaf ids, gathered and multiplied by ``cumprod`` over the levels, leaves an
nn.ModuleList of Sequential(Linear, activation module, Linear) mixed by ``torch.stack`` and a
weighted sum). Both take any activation, sigmoid included (not to be read as a decision).
Form B styles: ``ultrafast`` (gather/scatter chains under no_grad), ``one_hot`` (the path mask
as ``one_hot(...).sum``), ``node_major`` (neurons stored node-major, transposed to trees before the
decisions, mask by ``scatter_add``).
Look-alikes: ``swapped`` (one level's children swapped), ``not_a_tree`` (sigmoid products over
node sets that are not root-to-leaf paths).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fffcompile import activations, reference
from fffcompile.spec import FFFSpec

P = nn.Parameter


def _act(name):
    return lambda t: activations.apply(name, t)


def _tables(depth: int):
    """(L, D) node ids along each leaf's path and (L, D) 1.0 where the path goes right."""
    L = 2 ** depth
    nodes = torch.zeros(L, max(depth, 1), dtype=torch.long)
    right = torch.zeros(L, max(depth, 1))
    for j in range(L):
        n = 0
        for level in range(depth):
            r = (j >> (depth - 1 - level)) & 1
            nodes[j, level], right[j, level] = n, r
            n = 2 * n + 1 + r
    return nodes[:, :depth], right[:, :depth]


def _path_matrices(depth: int):
    nodes, right = _tables(depth)
    N, L = 2 ** depth - 1, 2 ** depth
    R, Lm = torch.zeros(N, L), torch.zeros(N, L)
    for j in range(L):
        for level in range(depth):
            (R if right[j, level] else Lm)[nodes[j, level], j] = 1.0
    return R, Lm



class Reference(nn.Module):
    """The independent oracle: reference.hard of the true spec, as a layer."""

    def __init__(self, spec: FFFSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x):
        return reference.hard(self.spec, x)

class _LeafParams(nn.Module):
    def __init__(self, spec: FFFSpec):
        super().__init__()
        self.depth, self.act = spec.depth, spec.activation
        self.w1, self.b1 = P(spec.leaf_w1.clone()), P(spec.leaf_b1.clone())
        self.linear = spec.leaf_w2 is None
        if not self.linear:
            self.w2, self.b2 = P(spec.leaf_w2.clone()), P(spec.leaf_b2.clone())

    def leaves_einsum(self, x):
        h = torch.einsum("bd,ldh->blh", x, self.w1) + self.b1
        if self.linear:
            return h
        return torch.einsum("blh,lho->blo", _act(self.act)(h), self.w2) + self.b2


class Unrolled(_LeafParams):
    """fastfeedforward.FFF.training_forward, depth a plain int."""

    def __init__(self, spec: FFFSpec, dropout: float = 0.0):
        super().__init__(spec)
        self.dropout = nn.Dropout(dropout)
        self.node_weights = P(spec.node_weight.clone())
        self.node_biases = P(spec.node_bias.clone().unsqueeze(1))
        self.width, self.out = spec.leaf_width, spec.d_out

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        B, L = x.shape[0], 2 ** self.depth
        mixture = torch.ones(B, L, dtype=x.dtype)
        for d in range(self.depth):
            lo, hi = 2 ** d - 1, 2 ** (d + 1) - 1
            logits = torch.matmul(x, self.node_weights[lo:hi].transpose(0, 1)) + self.node_biases[lo:hi].transpose(0, 1)
            p = torch.sigmoid(logits)
            pair = torch.cat(((1 - p).unsqueeze(-1), p.unsqueeze(-1)), -1).flatten(-2).unsqueeze(-1)
            mixture.view(B, 2 ** (d + 1), L // 2 ** (d + 1)).mul_(pair)
        h = torch.matmul(x, self.w1.transpose(0, 1).flatten(1, 2)).view(B, L, self.width)
        h.add_(self.b1)
        h = self.dropout(_act(self.act)(h))
        out = torch.empty(B, L, self.out, dtype=x.dtype)
        for i in range(L):
            out[:, i].copy_(torch.matmul(h[:, i], self.w2[i]) + self.b2[i])
        out.mul_(mixture.unsqueeze(-1))
        return out.sum(1).view(*shape[:-1], self.out)


class LeafMajor(_LeafParams):
    """Per-level node slices, mixture refined by view/mul; leaves by ``bmm`` over x expanded to
    (L, rows, d), so the leaf values hold the rows in their middle dim (L, rows, width)."""

    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.nw, self.nb = P(spec.node_weight.clone()), P(spec.node_bias.clone())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        B, L = x.shape[0], 2 ** self.depth
        mix = x.new_ones(B, L)
        for k in range(self.depth):
            lo, hi = 2 ** k - 1, 2 ** (k + 1) - 1
            p = torch.sigmoid(x @ self.nw[lo:hi].t() + self.nb[lo:hi])
            pair = torch.stack([1 - p, p], -1).flatten(1).unsqueeze(-1)
            mix = (mix.view(B, 2 ** (k + 1), L // 2 ** (k + 1)) * pair).reshape(B, L)
        h = torch.bmm(x.unsqueeze(0).expand(L, -1, -1), self.w1) + self.b1.unsqueeze(1)
        if not self.linear:
            h = torch.bmm(_act(self.act)(h), self.w2) + self.b2.unsqueeze(1)
        return (mix.unsqueeze(-1) * h.transpose(0, 1)).sum(1).reshape(*shape[:-1], -1)


class Table(_LeafParams):
    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.router = nn.Linear(spec.d_in, 2 ** spec.depth - 1)
        with torch.no_grad():
            self.router.weight.copy_(spec.node_weight)
            self.router.bias.copy_(spec.node_bias)
        nodes, right = _tables(spec.depth)
        self.register_buffer("nodes", nodes)
        self.register_buffer("right", right.bool())

    def forward(self, x):
        p = torch.sigmoid(self.router(x))                       # (..., N)
        pp = p[..., self.nodes]                                  # (..., L, D)
        mu = torch.where(self.right, pp, 1 - pp).prod(-1)        # (..., L)
        flat = x.reshape(-1, x.shape[-1])
        out = self.leaves_einsum(flat).reshape(*x.shape[:-1], mu.shape[-1], -1)
        return (mu.unsqueeze(-1) * out).sum(-2)


class LogSigmoid(_LeafParams):
    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.W, self.b = P(spec.node_weight.clone()), P(spec.node_bias.clone())
        nodes, right = _tables(spec.depth)
        self.register_buffer("nodes", nodes)
        self.register_buffer("right", right.bool())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        z = x @ self.W.T + self.b
        lp, ln = F.logsigmoid(z), F.logsigmoid(-z)
        mu = torch.where(self.right, lp[:, self.nodes], ln[:, self.nodes]).sum(-1).exp()   # (B, L)
        L = self.w1.shape[0]
        h = torch.bmm(x.unsqueeze(0).expand(L, -1, -1), self.w1) + self.b1.unsqueeze(1)    # (L, B, l)
        if not self.linear:
            h = torch.bmm(_act(self.act)(h), self.w2) + self.b2.unsqueeze(1)               # (L, B, o)
        return torch.einsum("bl,lbo->bo", mu, h).reshape(*shape[:-1], -1)


class PathMatrix(_LeafParams):
    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.W, self.b = P(spec.node_weight.clone()), P(spec.node_bias.clone())
        R, Lm = _path_matrices(spec.depth)
        self.register_buffer("R", R)
        self.register_buffer("Lm", Lm)

    def forward(self, x):
        z = F.linear(x, self.W, self.b)
        mu = torch.exp(F.logsigmoid(z) @ self.R + F.logsigmoid(-z) @ self.Lm)          # (..., L)
        h = torch.matmul(x.unsqueeze(-2).unsqueeze(-2), self.w1).squeeze(-2) + self.b1   # (..., L, l)
        if not self.linear:
            h = torch.matmul(_act(self.act)(h).unsqueeze(-2), self.w2).squeeze(-2) + self.b2
        return (mu.unsqueeze(-1) * h).sum(-2)


class SoftplusSoftmax(PathMatrix):
    """Leaf scores as a fixed 0/1 path matrix times softplus terms, normalised by a softmax:
    log mu_j = -sum_right softplus(-z) - sum_left softplus(z)."""

    def forward(self, x):
        z = F.linear(x, self.W, self.b)
        mu = torch.softmax(-(F.softplus(-z) @ self.R) - F.softplus(z) @ self.Lm, -1)
        h = torch.einsum("...d,ldh->...lh", x, self.w1) + self.b1
        if not self.linear:
            h = torch.einsum("...lh,lho->...lo", _act(self.act)(h), self.w2) + self.b2
        return torch.einsum("...l,...lo->...o", mu, h)


class LinearNoBias(_LeafParams):
    """Nodes without bias (spec.node_bias must be zero), any leaves."""

    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.W = P(spec.node_weight.clone())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        p = torch.sigmoid(x @ self.W.T)
        weights = torch.ones_like(p[:, :1])
        for level in range(self.depth):
            pl = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
            weights = (weights.unsqueeze(-1) * torch.stack((1 - pl, pl), -1)).reshape(x.shape[0], -1)
        out = torch.einsum("bl,blo->bo", weights, self.leaves_einsum(x))
        return out.reshape(*shape[:-1], -1)


class Threshold(_LeafParams):
    """Linear(d, 1) routers and a learned threshold: p_n = s(w_n . x + c_n - t_n)."""

    def __init__(self, spec: FFFSpec, seed: int = 0):
        super().__init__(spec)
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(spec.node_bias.shape, generator=g, dtype=torch.float64).to(spec.dtype) * 0.3
        self.routers = nn.ModuleList(nn.Linear(spec.d_in, 1) for _ in range(2 ** spec.depth - 1))
        with torch.no_grad():
            for n, r in enumerate(self.routers):
                r.weight.copy_(spec.node_weight[n:n + 1])
                r.bias.copy_(spec.node_bias[n:n + 1] + t[n])
        self.threshold = P(t)

    def forward(self, x):
        mix = [torch.ones_like(x[..., 0])]
        for level in range(self.depth):
            nxt = []
            for k, w in enumerate(mix):
                node = 2 ** level - 1 + k
                p = torch.sigmoid(self.routers[node](x).squeeze(-1) - self.threshold[node])
                nxt += [w * (1 - p), w * p]
            mix = nxt
        flat = x.reshape(-1, x.shape[-1])
        out = self.leaves_einsum(flat).reshape(*x.shape[:-1], len(mix), -1)
        return sum(w.unsqueeze(-1) * out[..., j, :] for j, w in enumerate(mix))


class Master(nn.Module):
    """Form C: s(k) * tree(x) + (1 - s(k)) * master(x); the tree written as ``Table``."""

    def __init__(self, spec: FFFSpec, hidden: int = 8, seed: int = 0):
        super().__init__()
        self.tree = Table(spec)
        g = torch.Generator().manual_seed(seed)
        self.m1 = nn.Linear(spec.d_in, hidden)
        self.m2 = nn.Linear(hidden, spec.d_out)
        self.k = P(torch.randn((), generator=g))

    def forward(self, x):
        s = torch.sigmoid(self.k)
        return s * self.tree(x) + (1 - s) * self.m2(F.gelu(self.m1(x)))


class Swapped(LinearNoBias):
    """Look-alike: level 1's children in the wrong order (left gets p, right gets 1 - p)."""

    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.b = P(spec.node_bias.clone())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        p = torch.sigmoid(x @ self.W.T + self.b)
        weights = torch.ones_like(p[:, :1])
        for level in range(self.depth):
            pl = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
            pair = torch.stack((pl, 1 - pl), -1) if level == 1 else torch.stack((1 - pl, pl), -1)
            weights = (weights.unsqueeze(-1) * pair).reshape(x.shape[0], -1)
        return torch.einsum("bl,blo->bo", weights, self.leaves_einsum(x)).reshape(*shape[:-1], -1)


class NotATree(Swapped):
    """Look-alike: products of sigmoids of the first nodes, whatever the level (paths share nodes wrongly)."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        p = torch.sigmoid(x @ self.W.T + self.b)
        weights = torch.ones_like(p[:, :1])
        for level in range(self.depth):
            pl = p[:, :2 ** level]
            weights = (weights.unsqueeze(-1) * torch.stack((1 - pl, pl), -1)).reshape(x.shape[0], -1)
        return torch.einsum("bl,blo->bo", weights, self.leaves_einsum(x)).reshape(*shape[:-1], -1)


class LevelParams(nn.Module):
    """nn.ParameterList of per-level node weights (2^l, d) and biases; mixture by an einsum outer
    product per level; leaves stacked, by ``baddbmm`` over x expanded to (L, rows, d)."""

    def __init__(self, spec: FFFSpec):
        super().__init__()
        self.act, L = spec.activation, 2 ** spec.depth
        self.ws = nn.ParameterList(P(spec.node_weight[2 ** l - 1: 2 ** (l + 1) - 1].clone()) for l in range(spec.depth))
        self.bs = nn.ParameterList(P(spec.node_bias[2 ** l - 1: 2 ** (l + 1) - 1].clone()) for l in range(spec.depth))
        self.W1, self.B1 = P(spec.leaf_w1.clone()), P(spec.leaf_b1.clone().unsqueeze(1))
        self.W2, self.B2 = P(spec.leaf_w2.clone()), P(spec.leaf_b2.clone().unsqueeze(1))

    def forward(self, x):
        lead = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1])
        mu = xf.new_ones(xf.shape[0], 1)
        for w, b in zip(self.ws, self.bs):
            p = torch.sigmoid(F.linear(xf, w, b))
            mu = torch.einsum("bn,bnc->bnc", mu, torch.stack([1 - p, p], -1)).reshape(xf.shape[0], -1)
        xs = xf.unsqueeze(0).expand(self.W1.shape[0], -1, -1)
        out = torch.baddbmm(self.B2, _act(self.act)(torch.baddbmm(self.B1, xs, self.W1)), self.W2)   # (L, rows, o)
        return (mu.t().unsqueeze(-1) * out).sum(0).reshape(*lead, -1)


_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class SeqLeaves(nn.Module):
    """One router Linear; each leaf's path by the parent recurrence from an arange of leaf ids, its
    node probabilities gathered and multiplied by cumprod over the levels; leaves an nn.ModuleList
    of Sequential(Linear, activation module, Linear), mixed by torch.stack and a weighted sum."""

    def __init__(self, spec: FFFSpec):
        super().__init__()
        self.depth = spec.depth
        self.router = nn.Linear(spec.d_in, 2 ** spec.depth - 1)
        self.leaves = nn.ModuleList(nn.Sequential(nn.Linear(spec.d_in, spec.leaf_width), _MODULES[spec.activation](),
                                                  nn.Linear(spec.leaf_width, spec.d_out)) for _ in range(2 ** spec.depth))
        with torch.no_grad():
            self.router.weight.copy_(spec.node_weight)
            self.router.bias.copy_(spec.node_bias)
            for j, leaf in enumerate(self.leaves):
                leaf[0].weight.copy_(spec.leaf_w1[j].T)
                leaf[0].bias.copy_(spec.leaf_b1[j])
                leaf[2].weight.copy_(spec.leaf_w2[j].T)
                leaf[2].bias.copy_(spec.leaf_b2[j])

    def forward(self, x):
        N, L, D = 2 ** self.depth - 1, 2 ** self.depth, self.depth
        p = torch.sigmoid(self.router(x))                                         # (..., N)
        node = torch.arange(L, device=x.device) + N                               # leaf ids, heap numbering
        parents, right = [], []
        for _ in range(D):
            parent = torch.div(node - 1, 2, rounding_mode="floor")
            right.append((node - 1) % 2)
            parents.append(parent)
            node = parent
        idx = torch.stack(parents[::-1], -1)                                      # (L, D), root first
        r = torch.stack(right[::-1], -1).to(x.dtype)
        g = p.unsqueeze(-2).expand(*p.shape[:-1], L, N).gather(-1, idx.expand(*p.shape[:-1], L, D))
        mu = torch.cumprod(r * g + (1 - r) * (1 - g), -1)[..., -1]               # (..., L)
        return (mu.unsqueeze(-1) * torch.stack([leaf(x) for leaf in self.leaves], -2)).sum(-2)


class Packed(nn.Module):
    """Every weight packed in one flat Parameter, sliced and viewed in forward (no parameter
    signature for the module frontend to see); per-level decisions, leaves by einsum."""

    def __init__(self, spec: FFFSpec):
        super().__init__()
        self.depth, self.act, self.linear = spec.depth, spec.activation, spec.leaf_w2 is None
        parts = [spec.node_weight, spec.node_bias, spec.leaf_w1, spec.leaf_b1]
        if not self.linear:
            parts += [spec.leaf_w2, spec.leaf_b2]
        self.shapes = [tuple(t.shape) for t in parts]
        self.theta = P(torch.cat([t.reshape(-1) for t in parts]))

    def _unpack(self):
        out, start = [], 0
        for shape in self.shapes:
            size = 1
            for d in shape:
                size *= d
            out.append(self.theta[start:start + size].view(shape))
            start += size
        return out

    def forward(self, x):
        W, b, W1, b1, *rest = self._unpack()
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights = torch.ones_like(x[:, :1])
        for level in range(self.depth):
            lo, hi = 2 ** level - 1, 2 ** (level + 1) - 1
            pl = torch.sigmoid(x @ W[lo:hi].T + b[lo:hi])
            weights = (weights.unsqueeze(-1) * torch.stack((1 - pl, pl), -1)).reshape(x.shape[0], -1)
        h = torch.einsum("bd,ldh->blh", x, W1) + b1
        if not self.linear:
            h = torch.einsum("blh,lho->blo", _act(self.act)(h), rest[0]) + rest[1]
        return torch.einsum("bl,blo->bo", weights, h).reshape(*shape[:-1], -1)


class RowLoop(_LeafParams):
    """A hard form A forward written as a Python loop over the rows (specialised to the example's
    batch when captured): B copies of one descent, read as one and rewritten batch-generic.
    ``uneven``: odd rows scale their output by 2 (a look-alike: the rows are not one program)."""

    def __init__(self, spec: FFFSpec, uneven: bool = False):
        super().__init__(spec)
        self.nw, self.nb = P(spec.node_weight.clone()), P(spec.node_bias.clone())
        self.uneven = uneven

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        outs = []
        for r in range(x.shape[0]):
            node = torch.zeros((), dtype=torch.long)
            for _ in range(self.depth):
                z = self.nw.index_select(0, node.view(1)) @ x[r] + self.nb.index_select(0, node.view(1))
                node = node * 2 + 1 + (z >= 0).long().view(())
            j = node - (2 ** self.depth - 1)
            h = x[r] @ self.w1[j] + self.b1[j]
            out = h if self.linear else _act(self.act)(h) @ self.w2[j] + self.b2[j]
            outs.append(out * (1 + r % 2) if self.uneven else out)
        return torch.stack(outs).reshape(*shape[:-1], -1)


class HardIndex(_LeafParams):
    """A form A tree that already descends: per level index_select of the node row, the index
    recurrence 2n + 1 + [z >= 0], leaves by bmm against the gathered leaf weights."""

    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.W, self.b, self.tie = P(spec.node_weight.clone()), P(spec.node_bias.clone()), spec.tie

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        cur = torch.zeros(x.shape[0], dtype=torch.long)
        for _ in range(self.depth):
            w = torch.index_select(self.W, 0, cur)                                       # (B, d)
            z = torch.bmm(x.unsqueeze(1), w.unsqueeze(2)).reshape(-1) + torch.index_select(self.b, 0, cur)
            go = (z >= 0) if self.tie == "ge" else (z > 0)
            cur = 2 * cur + 1 + go.long()
        leaf = cur - (2 ** self.depth - 1)
        h = torch.bmm(x.unsqueeze(1), self.w1[leaf]).squeeze(1) + self.b1[leaf]
        if not self.linear:
            h = torch.bmm(_act(self.act)(h).unsqueeze(1), self.w2[leaf]).squeeze(1) + self.b2[leaf]
        return h.reshape(*shape[:-1], -1)


class HardDense(_LeafParams):
    """A descending form A tree over all node logits at once: z = x W^T + b, per level
    gather(z, n) > 0, leaves as one einsum of every leaf then a gather of the chosen one."""

    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        self.W, self.b, self.tie = P(spec.node_weight.clone()), P(spec.node_bias.clone()), spec.tie

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        z = x @ self.W.T + self.b
        node = torch.zeros(x.shape[0], 1, dtype=torch.long)
        for _ in range(self.depth):
            zn = z.gather(1, node)
            node = 2 * node + 1 + ((zn >= 0) if self.tie == "ge" else (zn > 0)).long()
        leaf = (node - (2 ** self.depth - 1)).squeeze(1)
        every = self.leaves_einsum(x)                                                     # (B, L, o)
        return every[torch.arange(x.shape[0]), leaf].reshape(*shape[:-1], -1)


# ----------------------------------------------------------------------------- form B

class _NeuronParams(nn.Module):
    def __init__(self, spec: FFFSpec):
        super().__init__()
        self.trees, self.depth, self.act, self.tie = spec.trees, spec.depth, spec.activation, spec.tie
        self.n = spec.nodes_per_tree
        self.linear_in = nn.Linear(spec.d_in, self.trees * self.n)
        self.linear_out = nn.Linear(self.trees * self.n, spec.d_out)
        with torch.no_grad():
            self.linear_in.weight.copy_(spec.node_weight.reshape(-1, spec.d_in))
            self.linear_in.bias.copy_(spec.node_bias.reshape(-1))
            self.linear_out.weight.copy_(spec.out_weight.reshape(-1, spec.d_out).T)
            self.linear_out.bias.copy_(spec.out_bias)

    def decide(self, a):
        return (a >= 0) if self.tie == "ge" else (a > 0)


class UltraFast(_NeuronParams):
    def forward(self, oldx):
        x = oldx.reshape(-1, oldx.shape[-1])
        B = x.shape[0]
        logits = self.linear_in(x)
        decisions = self.decide(logits).long().view(B, self.trees, self.n)
        acts = _act(self.act)(logits).view(B, self.trees, self.n)
        with torch.no_grad():
            current = torch.zeros((B, self.trees), dtype=torch.long, device=x.device)
            mask = torch.zeros_like(decisions, dtype=x.dtype)
            mask.scatter_(2, current.unsqueeze(-1), 1.0)
            for d in range(self.depth):
                moves = torch.gather(decisions, 2, current.unsqueeze(2)).squeeze(2)
                current = (current - (2 ** d - 1)) * 2 + moves + (2 ** (d + 1) - 1)
                mask.scatter_(2, current.unsqueeze(-1), 1.0)
        y = self.linear_out((acts * mask).flatten(1, 2))
        return y.view(oldx.shape[:-1] + (self.linear_out.out_features,))     # fx-traceable


class OneHot(_NeuronParams):
    def forward(self, x):
        a = self.linear_in(x)
        lead = a.shape[:-1]
        a3 = a.reshape(lead + (self.trees, self.n))
        go = self.decide(a3).long()
        node = torch.zeros_like(go[..., 0])
        visited = [node]
        for _ in range(self.depth):
            node = 2 * node + 1 + go.gather(-1, node.unsqueeze(-1)).squeeze(-1)
            visited.append(node)
        mask = F.one_hot(torch.stack(visited, -1), self.n).sum(-2).to(a.dtype)
        return self.linear_out((_act(self.act)(a3) * mask).reshape(lead + (-1,)))


class NodeMajor(_NeuronParams):
    """Neurons stored node-major (row k P + p of linear_in, column k P + p of linear_out); the layer
    views (rows, n, P) and transposes to (rows, P, n) before deciding by torch.where(a > 0, 1., 0.),
    builds the mask by scatter_add of ones, and transposes back before linear_out."""

    def __init__(self, spec: FFFSpec):
        super().__init__(spec)
        order = torch.arange(self.trees * self.n).view(self.trees, self.n).T.reshape(-1)   # k P + p -> p n + k
        with torch.no_grad():
            self.linear_in.weight.copy_(spec.node_weight.reshape(-1, spec.d_in)[order])
            self.linear_in.bias.copy_(spec.node_bias.reshape(-1)[order])
            self.linear_out.weight.copy_(spec.out_weight.reshape(-1, spec.d_out)[order].T)

    def forward(self, x):
        lead = x.shape[:-1]
        a = self.linear_in(x.reshape(-1, x.shape[-1])).view(-1, self.n, self.trees).transpose(1, 2)   # (rows, P, n)
        go = torch.where(self.decide(a), 1.0, 0.0)
        node = torch.zeros(a.shape[0], self.trees, 1, dtype=torch.long)
        ones = torch.ones(a.shape[0], self.trees, 1, dtype=a.dtype)
        mask = torch.zeros_like(a).scatter_add(2, node, ones)
        for _ in range(self.depth):
            node = (2 * node + 1 + go.gather(2, node)).long()
            mask = mask.scatter_add(2, node, ones)
        h = (_act(self.act)(a) * mask).transpose(1, 2).reshape(a.shape[0], -1)
        return self.linear_out(h).reshape(*lead, -1)


STYLES_A = {"packed": Packed, "unrolled": Unrolled, "leaf_major": LeafMajor, "table": Table, "logsigmoid": LogSigmoid, "path_matrix": PathMatrix,
            "threshold": Threshold}
STYLES_HARD_A = {"hard_index": HardIndex, "hard_dense": HardDense}
STYLES_B = {"ultrafast": UltraFast, "one_hot": OneHot}


class SharedInput(nn.Module):
    """Two FFF layers of their own styles reading the same input tensor, their outputs summed
    (a parallel block): two trees, two candidates."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x) + self.second(x)
