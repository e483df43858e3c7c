"""NeuronTree: a trainable UltraFastBERT-style neuron tree layer (FORMS.md form B).

P parallel trees of depth D, each with n = 2^(D+1) - 1 neurons, tree-major:

    a = x W_in^T + b_in (every neuron), path per tree: n_0 = 0, n_{k+1} = 2 n_k + 1 + [a_{p,n_k} > 0]
    y = sum_p sum_{n on path p} act(a_{p,n}) W_out[p, n] + b_out

Training forward: the dense layer times a 0/1 path mask built under no_grad (the published
training graph, already exactly hard). Eval forward: the fused op, touching P (D + 1) neurons;
in CPU eager eval through the op's C++ kernel directly (``runtime.fast_path.FastTree``: the same
numbers without the dispatcher's per-call cost; the op itself under compile, export and tracing).
Weights are stored in the op's layout: in_weight (P, n, d_in), out_weight (P, n, d_out).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import activations
from ..runtime.fast_path import FastTree
from ..spec import ACTIVATIONS, TIES


class NeuronTree(FastTree, nn.Module):
    _FAST_WATCH = frozenset(("in_weight", "in_bias", "out_weight", "out_bias"))

    def __init__(self, in_features: int, out_features: int, depth: int, trees: int = 1,
                 activation: str = "gelu", out_bias: bool = False, tie: str = "gt"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if tie not in TIES:
            raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
        if depth < 0 or trees < 1 or in_features < 1 or out_features < 1:
            raise ValueError("widths and trees must be positive and depth non-negative")
        self.in_features, self.out_features, self.depth, self.trees = in_features, out_features, depth, trees
        self.activation, self.tie = activation, tie
        n = 2 ** (depth + 1) - 1
        bound_in, bound_out = 1 / math.sqrt(in_features), 1 / math.sqrt(trees * (depth + 1))
        self.in_weight = nn.Parameter(torch.empty(trees, n, in_features).uniform_(-bound_in, bound_in))
        self.in_bias = nn.Parameter(torch.empty(trees, n).uniform_(-bound_in, bound_in))
        self.out_weight = nn.Parameter(torch.empty(trees, n, out_features).uniform_(-bound_out, bound_out))
        self.out_bias = nn.Parameter(torch.zeros(out_features), requires_grad=out_bias)
        self._drop_fast()

    def _fast_config(self):   # runtime.fast_path.FastTree: the eval forward's tree
        return ("neuron_tree", self.activation, self.tie, True,
                (self.in_weight, self.in_bias, self.out_weight, self.out_bias))

    def _fast_allowed(self) -> bool:
        return not self.training

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
                f"trees={self.trees}, activation={self.activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            y = self._fast_tree(x)
            if y is not None:
                return y
            return torch.ops.fffcompile.neuron_tree(x, self.in_weight, self.in_bias, self.out_weight, self.out_bias,
                                                    self.activation, self.tie)
        lead = x.shape[:-1]
        X = x.reshape(-1, self.in_features)
        a = torch.einsum("bd,pnd->bpn", X, self.in_weight) + self.in_bias          # (B, P, n)
        with torch.no_grad():
            right = (a > 0) if self.tie == "gt" else (a >= 0)
            node = torch.zeros(X.shape[0], self.trees, 1, dtype=torch.long, device=x.device)
            mask = torch.zeros_like(a)
            mask.scatter_(2, node, 1.0)
            for _ in range(self.depth):
                node = 2 * node + 1 + right.gather(2, node).long()
                mask.scatter_(2, node, 1.0)
        y = torch.einsum("bpn,pno->bo", activations.apply(self.activation, a) * mask, self.out_weight) + self.out_bias
        return y.reshape(*lead, self.out_features)
