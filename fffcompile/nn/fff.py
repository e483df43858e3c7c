"""FFF: a trainable leaf-MLP tree (FORMS.md form A) with an optional master leaf (form C).

Training forward (soft): node probabilities p_n = s(W_n . x + b_n), leaf weights
mu_j = prod over j's path of (p_n or 1 - p_n), y = sum_j mu_j f_j(x) with
f_j(x) = act(x W1_j + b1_j) W2_j + b2_j. With ``train_hardened=True`` training runs the hard
descent instead (no gradient reaches the nodes, as in the fastfeedforward package).
Eval forward: the fused hard descent op, y = f_leaf(x), leaf chosen by [z_n >= 0]; in CPU eager
eval it runs through the op's C++ kernel directly (``runtime.fast_path.FastTree``, the same
numbers without the dispatcher's per-call cost; the op itself under compile, export and tracing).
Form C: y = s(k) tree(x) + (1 - s(k)) M(x), M a dense MLP of width ``master_width``.

Auxiliary losses (FORMS.md form C), from the last training forward while
``track_auxiliary_losses`` is on (it never runs under tracing, export or no_grad):
- hardening: mean over nodes of the batch-mean Bernoulli entropy H(p_n);
- load balancing: 2^D / B^2 * sum_j (sum_b mu_j(x_b)) (sum_b [leaf(x_b) = j]).
``fffcompile.nn.auxiliary_loss(model, balance=, hardening=)`` sums them over a model.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import activations
from ..runtime.fast_path import FastTree
from ..spec import ACTIVATIONS, TIES
from .tracing import is_tracing


_TREE = ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2")


class FFF(FastTree, nn.Module):
    _FAST_WATCH = frozenset(_TREE + ("master_w1", "master_b1", "master_w2", "master_b2", "master_logit"))

    def __init__(self, in_features: int, out_features: int, depth: int, leaf_width: int,
                 activation: str = "relu", master_width: int = 0, train_hardened: bool = False,
                 tie: str = "ge", track_auxiliary_losses: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if tie not in TIES:
            raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
        if depth < 0 or in_features < 1 or out_features < 1 or leaf_width < 1 or master_width < 0:
            raise ValueError("widths must be positive and depth non-negative")
        self.in_features, self.out_features, self.depth, self.leaf_width = in_features, out_features, depth, leaf_width
        self.activation, self.tie, self.train_hardened = activation, tie, train_hardened
        self.track_auxiliary_losses = track_auxiliary_losses
        n_nodes, n_leaves = 2 ** depth - 1, 2 ** depth
        bound_in, bound_hidden = 1 / math.sqrt(in_features), 1 / math.sqrt(leaf_width)
        uniform = lambda *shape, bound: nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))
        self.node_weight = uniform(n_nodes, in_features, bound=bound_in)
        self.node_bias = uniform(n_nodes, bound=bound_in)
        self.leaf_w1 = uniform(n_leaves, in_features, leaf_width, bound=bound_in)
        self.leaf_b1 = uniform(n_leaves, leaf_width, bound=bound_in)
        self.leaf_w2 = uniform(n_leaves, leaf_width, out_features, bound=bound_hidden)
        self.leaf_b2 = uniform(n_leaves, out_features, bound=bound_hidden)
        self.master_width = master_width
        if master_width:
            bound_master = 1 / math.sqrt(master_width)
            self.master_w1 = uniform(in_features, master_width, bound=bound_in)
            self.master_b1 = uniform(master_width, bound=bound_in)
            self.master_w2 = uniform(master_width, out_features, bound=bound_master)
            self.master_b2 = uniform(out_features, bound=bound_master)
            self.master_logit = nn.Parameter(torch.tensor(2.0))   # s(2) = 0.88: the tree dominates at start
        self._aux: Optional[dict] = None
        self._drop_fast()

    def _fast_config(self):   # runtime.fast_path.FastTree: the eval forward's tree
        return ("leaf_mlp", self.activation, self.tie, not self.master_width,
                tuple(getattr(self, name) for name in _TREE))

    def _fast_allowed(self) -> bool:
        return not self.training

    def extra_repr(self) -> str:
        master = f", master_width={self.master_width}" if self.master_width else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
                f"leaf_width={self.leaf_width}, activation={self.activation!r}{master}")

    def __getstate__(self):
        # the last batch's statistics carry autograd history: never copied or pickled
        state = super().__getstate__()
        state["_aux"] = None
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.train_hardened:
            y = self._soft(x)
        else:
            if self.training and not is_tracing():
                self._aux = None   # hard decisions: no statistics for the auxiliary losses
            y = self._fast_tree(x)
            if y is None:
                y = torch.ops.fffcompile.leaf_mlp_tree(x, self.node_weight, self.node_bias, self.leaf_w1, self.leaf_b1,
                                                       self.leaf_w2, self.leaf_b2, self.activation, self.tie)
        if self.master_width:
            master = activations.apply(self.activation, x @ self.master_w1 + self.master_b1) @ self.master_w2 + self.master_b2
            k = torch.sigmoid(self.master_logit)
            y = k * y + (1 - k) * master
        return y

    def _soft(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        X = x.reshape(-1, self.in_features)
        rows = X.shape[0]
        z = X @ self.node_weight.T + self.node_bias                       # (B, N)
        p = torch.sigmoid(z)
        mu = X.new_ones(rows, 1)
        for level in range(self.depth):
            p_level = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
            mu = torch.stack((mu * (1 - p_level), mu * p_level), -1).reshape(rows, 2 ** (level + 1))
        h = activations.apply(self.activation, torch.einsum("bd,ldh->blh", X, self.leaf_w1) + self.leaf_b1)
        leaf_out = torch.einsum("blh,lho->blo", h, self.leaf_w2) + self.leaf_b2
        y = torch.einsum("bl,blo->bo", mu, leaf_out)
        if self.track_auxiliary_losses and torch.is_grad_enabled() and not is_tracing():
            self._aux = {"p": p, "z": z, "mu": mu}
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ auxiliary losses
    def hardening_loss(self) -> torch.Tensor:
        """Mean node entropy of the last training batch (0 before any)."""
        if not self._aux or self.depth == 0:
            return self.node_weight.new_zeros(())
        p = self._aux["p"].clamp(1e-6, 1 - 1e-6)
        return (-(p * p.log()) - (1 - p) * (1 - p).log()).mean()

    def load_balancing_loss(self) -> torch.Tensor:
        """2^D / B^2 * sum_j (sum_b mu_j) (sum_b [hard leaf = j]); 1.0 when perfectly balanced."""
        if not self._aux:
            return self.node_weight.new_zeros(())
        mu, z = self._aux["mu"], self._aux["z"]
        rows = mu.shape[0]
        node = torch.zeros(rows, dtype=torch.long, device=mu.device)
        for _ in range(self.depth):
            right = z.gather(1, node.unsqueeze(1)).squeeze(1)
            node = 2 * node + 1 + ((right >= 0) if self.tie == "ge" else (right > 0)).long()
        leaf = node - (2 ** self.depth - 1)
        counts = torch.bincount(leaf, minlength=2 ** self.depth).to(mu.dtype)
        return (2 ** self.depth) / max(rows, 1) ** 2 * (mu.sum(0) * counts).sum()
