"""The activations an FFFSpec may name, their forward and their derivative.

relu, gelu (erf form), gelu_tanh (tanh approximation), silu, sigmoid, tanh, relu2 (ReLU
squared, used by some leaf experts) and identity (linear leaves). Every backend implements
exactly these formulas; the derivatives serve the op's backward.
"""
import math

import torch
import torch.nn.functional as F

from .errors import InvalidSpecError

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def apply(name: str, t: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(t)
    if name == "gelu":
        return F.gelu(t)
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if name == "silu":
        return F.silu(t)
    if name == "sigmoid":
        return torch.sigmoid(t)
    if name == "tanh":
        return torch.tanh(t)
    if name == "relu2":
        return torch.relu(t).square()
    if name == "identity":
        return t
    raise InvalidSpecError(f"unknown activation {name!r}")


def derivative(name: str, t: torch.Tensor) -> torch.Tensor:
    """d act(t) / dt, elementwise (the subgradient 0 at the kinks of relu and relu2)."""
    if name == "relu":
        return (t > 0).to(t.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
        return cdf + t * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (t + 0.044715 * t.pow(3))
        th = torch.tanh(inner)
        return 0.5 * (1.0 + th) + 0.5 * t * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * t * t)
    if name == "silu":
        s = torch.sigmoid(t)
        return s * (1.0 + t * (1.0 - s))
    if name == "sigmoid":
        s = torch.sigmoid(t)
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 - torch.tanh(t).square()
    if name == "relu2":
        return 2.0 * torch.relu(t)
    if name == "identity":
        return torch.ones_like(t)
    raise InvalidSpecError(f"unknown activation {name!r}")
