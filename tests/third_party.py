"""FFF layers and look-alikes written the way other people write them (test fixtures only).

``UltraFastBERTFFF`` follows the published UltraFastBERT training layer (linear_in over every
neuron, > 0 decisions, a path mask built with gather/scatter under no_grad, linear_out).
``LookAlike`` builds modules whose parameter shapes fit an FFF signature exactly but whose
forward is something else; every one of them must come out of optimize() untouched.
"""
import torch
from torch import nn


class UltraFastBERTFFF(nn.Module):
    def __init__(self, input_width, output_width, depth, parallel_size, activation=nn.GELU):
        super().__init__()
        self.input_width, self.output_width = input_width, output_width
        self.depth, self.parallel_size = depth, parallel_size
        self.n_nodes = 2 ** (depth + 1) - 1
        self.linear_in = nn.Linear(input_width, parallel_size * self.n_nodes, bias=True)
        self.linear_out = nn.Linear(parallel_size * self.n_nodes, output_width, bias=False)
        self.activation = activation()

    def forward(self, oldx):
        x = oldx.reshape(-1, self.input_width)
        batch_size = x.shape[0]
        logits = self.linear_in(x)
        logit_decisions = (logits > 0).long()
        activations = self.activation(logits)
        activations = activations.view(batch_size, self.parallel_size, self.n_nodes)
        decisions = logit_decisions.view(batch_size, self.parallel_size, self.n_nodes)
        with torch.no_grad():
            current_nodes = torch.zeros((batch_size, self.parallel_size), dtype=torch.long, device=x.device)
            decision_map = torch.zeros_like(decisions, dtype=torch.float)
            decision_map.scatter_(dim=2, index=current_nodes.unsqueeze(-1), value=1.0)
            for d in range(self.depth):
                current_platform = 2 ** d - 1
                next_platform = 2 ** (d + 1) - 1
                moves = torch.gather(decisions, 2, current_nodes.unsqueeze(2)).squeeze(2)
                next_nodes = (current_nodes - current_platform) * 2 + moves + next_platform
                decision_map.scatter_(2, next_nodes.unsqueeze(-1), 1.0)
                current_nodes = next_nodes
        activations = activations * decision_map
        new_logits = self.linear_out(activations.flatten(1, 2))
        return new_logits.reshape(*oldx.shape[:-1], self.output_width)


class SoftTreeMixture(nn.Module):
    """A soft leaf-MLP tree written with a ModuleList-free stacked layout, or one of its look-alikes.

    kind: "tree" (a real FFF, form A), "softmax_moe" (8 experts gated by a softmax over the 7
    router logits and a zero), "not_a_tree" (products of sigmoids over node sets that are not
    root-to-leaf paths), "swapped_children" (one level's children in the wrong order),
    "gated_residual" (x + s(g) * f(x), no tree at all).
    """

    def __init__(self, d, depth=3, hidden=8, kind="tree"):
        super().__init__()
        self.kind, self.depth = kind, depth
        leaves = 2 ** depth
        self.router = nn.Parameter(torch.randn(leaves - 1, d) / d ** 0.5)
        self.router_bias = nn.Parameter(torch.randn(leaves - 1) * 0.1)
        self.experts_in = nn.Parameter(torch.randn(leaves, d, hidden) / d ** 0.5)
        self.experts_in_bias = nn.Parameter(torch.randn(leaves, hidden) * 0.1)
        self.experts_out = nn.Parameter(torch.randn(leaves, hidden, d) / hidden ** 0.5)
        self.experts_out_bias = nn.Parameter(torch.randn(leaves, d) * 0.1)

    def _leaves(self, x):
        h = torch.relu(torch.einsum("bd,ldh->blh", x, self.experts_in) + self.experts_in_bias)
        return torch.einsum("blh,lho->blo", h, self.experts_out) + self.experts_out_bias

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        z = x @ self.router.T + self.router_bias
        if self.kind == "softmax_moe":
            weights = torch.softmax(torch.cat([z, torch.zeros_like(z[:, :1])], 1), 1)
        elif self.kind == "gated_residual":
            gate = torch.sigmoid(z[:, :1])
            return (x + gate * self._leaves(x).mean(1)).reshape(shape)
        else:
            p = torch.sigmoid(z)
            weights = torch.ones_like(z[:, :1])
            for level in range(self.depth):
                pl = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
                if self.kind == "not_a_tree":
                    pl = p[:, :2 ** level]       # the first nodes of the tree, whatever the level
                if self.kind == "swapped_children" and level == 1:
                    pair = torch.stack((pl, 1 - pl), -1)
                else:
                    pair = torch.stack((1 - pl, pl), -1)
                weights = (weights.unsqueeze(-1) * pair).reshape(x.shape[0], -1)
        out = torch.einsum("bl,blo->bo", weights, self._leaves(x))
        return out.reshape(*shape[:-1], -1)


class DenseLookAlike(nn.Module):
    """Linear pairs whose shapes fit a neuron tree (width 15 = one tree of depth 3) but are not one.

    kind: "mlp" (dense GELU MLP), "swiglu" (gate and up projections), "masked_wrong" (a path mask
    that follows the decisions of the wrong child).
    """

    def __init__(self, d, kind="mlp", width=15):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d, width)
        self.down = nn.Linear(width, d, bias=False)
        if kind == "swiglu":
            self.gate = nn.Linear(d, width, bias=False)

    def forward(self, x):
        a = self.up(x)
        if self.kind == "swiglu":
            return self.down(torch.nn.functional.silu(self.gate(x)) * a)
        if self.kind == "masked_wrong":
            flat = a.reshape(-1, a.shape[-1])
            node = torch.zeros(flat.shape[0], 1, dtype=torch.long)
            mask = torch.zeros_like(flat).scatter_(1, node, 1.0)
            for _ in range(3):
                node = 2 * node + 1 + (flat.gather(1, node) <= 0).long()   # goes left when > 0
                mask.scatter_(1, node, 1.0)
            return self.down(torch.nn.functional.gelu(flat) * mask).reshape(*x.shape[:-1], -1)
        return self.down(torch.nn.functional.gelu(a))


class Block(nn.Module):
    """A transformer-like block: attention, norms, and ``ff`` as the feedforward."""

    def __init__(self, d, ff, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = ff

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, d, ffs, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, ff) for ff in ffs)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class ModuleListTree(nn.Module):
    """An FFF written with ModuleLists: one Linear(d, 1) router per node, one small MLP per leaf.

    Training forward: soft, node by node. Eval forward: a per-row Python descent (no graph
    capture can follow it). ``threshold``: go right when the router output exceeds a learned
    per-node threshold instead of 0.
    """

    def __init__(self, d, out, depth=3, hidden=6, threshold=False, activation=nn.GELU):
        super().__init__()
        self.depth = depth
        self.routers = nn.ModuleList(nn.Linear(d, 1) for _ in range(2 ** depth - 1))
        self.leaves = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), activation(), nn.Linear(hidden, out))
                                    for _ in range(2 ** depth))
        self.threshold = nn.Parameter(torch.randn(2 ** depth - 1) * 0.3) if threshold else None

    def _logit(self, node, x):
        z = self.routers[node](x).squeeze(-1)
        return z - self.threshold[node] if self.threshold is not None else z

    def forward(self, x):
        if not self.training:
            rows = []
            for row in x.reshape(-1, x.shape[-1]):
                node = 0
                for _ in range(self.depth):
                    node = 2 * node + (2 if self._logit(node, row) > 0 else 1)
                rows.append(self.leaves[node - (2 ** self.depth - 1)](row))
            return torch.stack(rows).reshape(*x.shape[:-1], -1)
        mix = [torch.ones_like(x[..., 0])]
        for level in range(self.depth):
            nxt = []
            for k, weight in enumerate(mix):
                p = torch.sigmoid(self._logit(2 ** level - 1 + k, x))
                nxt += [weight * (1 - p), weight * p]
            mix = nxt
        return sum(w.unsqueeze(-1) * leaf(x) for w, leaf in zip(mix, self.leaves))
