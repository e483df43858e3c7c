"""Layers that users train and fffcompile compiles: FFF (forms A and C) and NeuronTree (form B).

The compiler never depends on these classes (it finds layers by structure and numbers);
they are offered so that models trained with them compile, and they serve as test fixtures.
"""
import torch
from torch import nn

from .fff import FFF
from .neuron_tree import NeuronTree


def auxiliary_loss(model: nn.Module, balance: float = 0.0, hardening: float = 0.0) -> torch.Tensor:
    """balance * load-balancing loss + hardening * node-entropy loss, summed over every FFF in model.

    Uses the statistics of the last training forward of each layer; add it to the task loss.
    """
    total = None
    for layer in model.modules():
        if isinstance(layer, FFF):
            term = balance * layer.load_balancing_loss() + hardening * layer.hardening_loss()
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


__all__ = ["FFF", "NeuronTree", "auxiliary_loss"]
