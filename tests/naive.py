"""An independent, deliberately naive oracle: FORMS.md read literally, one row at a time, in float64.

Shares no code with fffcompile.reference (it checks it). Slow; for small specs only.
"""
import math

import torch


def _act(name, t):
    t = float(t)
    return {
        "relu": lambda v: max(v, 0.0),
        "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
        "gelu_tanh": lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
        "silu": lambda v: v / (1 + math.exp(-v)) if v > -700 else 0.0,
        "sigmoid": lambda v: 1 / (1 + math.exp(-v)) if v > -700 else 0.0,
        "tanh": math.tanh,
        "relu2": lambda v: max(v, 0.0) ** 2,
        "identity": lambda v: v,
    }[name](t)


def _right(z, tie):
    return z >= 0 if tie == "ge" else z > 0


def hard_row(spec, x):
    """y for one row x (list of floats), following FORMS.md's hard descriptions."""
    d = lambda t: t.double().tolist()
    if spec.form == "leaf_mlp":
        W, b = d(spec.node_weight), d(spec.node_bias)
        n = 0
        for _ in range(spec.depth):
            z = sum(w * v for w, v in zip(W[n], x)) + b[n]
            n = 2 * n + 1 + (1 if _right(z, spec.tie) else 0)
        j = n - (2 ** spec.depth - 1)
        W1, b1 = d(spec.leaf_w1[j]), d(spec.leaf_b1[j])
        h = [_act(spec.activation, sum(x[i] * W1[i][k] for i in range(len(x))) + b1[k]) for k in range(len(b1))]
        if spec.leaf_w2 is None:
            y = h
        else:
            W2, b2 = d(spec.leaf_w2[j]), d(spec.leaf_b2[j])
            y = [sum(h[k] * W2[k][o] for k in range(len(h))) + b2[o] for o in range(len(b2))]
        if spec.has_master:
            M1, m1, M2, m2 = d(spec.master_w1), d(spec.master_b1), d(spec.master_w2), d(spec.master_b2)
            hm = [_act(spec.master_activation, sum(x[i] * M1[i][k] for i in range(len(x))) + m1[k]) for k in range(len(m1))]
            m = [sum(hm[k] * M2[k][o] for k in range(len(hm))) + m2[o] for o in range(len(m2))]
            s = 1 / (1 + math.exp(-float(spec.master_logit)))
            y = [s * a + (1 - s) * c for a, c in zip(y, m)]
        return y
    W, b, V, c = d(spec.node_weight), d(spec.node_bias), d(spec.out_weight), d(spec.out_bias)
    y = list(c)
    for p in range(spec.trees):
        n = 0
        for _ in range(spec.depth + 1):
            a = sum(w * v for w, v in zip(W[p][n], x)) + b[p][n]
            g = _act(spec.activation, a)
            y = [yo + g * vo for yo, vo in zip(y, V[p][n])]
            n = 2 * n + 1 + (1 if _right(a, spec.tie) else 0)
    return y


def hard(spec, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, spec.d_in).double().tolist()
    out = torch.tensor([hard_row(spec, r) for r in rows], dtype=torch.float64).reshape(len(rows), spec.d_out)
    return out.reshape(*x.shape[:-1], spec.d_out)
