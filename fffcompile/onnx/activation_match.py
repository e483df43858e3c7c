"""Which activation a graph applies to a pre-activation a, found by numbers rather than by op names.

Exporters write one activation many ways (``Relu``; ``Gelu``; GELU as
``Mul(Mul(a, 0.5), Add(Erf(Div(a, 1.414)), 1))``; SiLU as ``Mul(a, Sigmoid(a))``). The
*elementwise closure* of a is every node of the region that reads only a, values of the
closure and constants, with an elementwise op type. Each value h of the closure with a's shape
is compared, on probe rows, with act(a) for every activation ``FFFSpec`` knows; the last value
in graph order that equals one of them (to float tolerance) is the activation output. No match:
the identity (linear leaves, or a neuron tree without activation), h = a.

Must not fire on anything but a pure function of a alone: a value that also reads the router
probabilities or another input is outside the closure by construction.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import activations
from ..compare import default_tolerance
from .graph_index import GraphIndex

ELEMENTWISE = ("Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Mul", "Add", "Sub", "Div", "Pow", "Sqrt", "Neg", "Exp",
               "Log", "Softplus", "Abs", "Max", "Min", "Clip", "LeakyRelu", "Elu", "Selu", "HardSigmoid", "Identity",
               "Cast", "Where", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or")
# Tried in this order; the first that fits names the activation.
CANDIDATES = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "relu2")


def elementwise_closure(index: GraphIndex, a: str, nodes: set[int]) -> list[str]:
    """Float values computed from ``a`` (and constants) alone by elementwise ops, in graph order."""
    closure, values = {a}, []
    for i in sorted(nodes):
        if index.producer.get(a, -1) >= i:
            continue
        node = index.nodes[i]
        if node.op_type not in ELEMENTWISE:
            continue
        ins = [n for n in node.input if n]
        if not ins or not all(n in closure or n in index.constant for n in ins) or not any(n in closure for n in ins):
            continue
        for out in node.output:
            if out:
                closure.add(out)
                values.append(out)
    return values


def match_activation(a_value: np.ndarray, values: dict[str, np.ndarray],
                     dtype: torch.dtype = torch.float32) -> tuple[str, str | None]:
    """(activation, name of the value holding it) from a's probe values and the closure's values (graph order).

    ``dtype``: the model's own precision. A 16-bit model read through its float32 twin (``widen``) holds
    16-bit constants (GELU's 1/sqrt(2), 0.044715), so its values match to that dtype's tolerance; the
    candidate that fits best is taken (GELU's erf and tanh forms differ by less than a float16 step)."""
    a = torch.from_numpy(np.asarray(a_value, dtype=np.float64))
    atol, rtol = default_tolerance(dtype)
    atol, rtol = max(atol, 1e-5), max(rtol, 1e-4)
    best = ("identity", None)
    for name, value in values.items():
        value = np.asarray(value)
        if value.shape != a_value.shape or value.dtype.kind != "f":
            continue
        h = torch.from_numpy(value.astype(np.float64))
        fits = []
        for act in CANDIDATES:
            expected = activations.apply(act, a)
            scale = max(1.0, float(expected.abs().max()))
            if torch.allclose(h, expected, rtol=rtol, atol=atol * scale):
                fits.append((float((h - expected).abs().max()) / scale, act))
                if dtype not in (torch.float16, torch.bfloat16):
                    break
        if fits:
            best = (min(fits)[1], name)
    return best
