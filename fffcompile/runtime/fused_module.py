"""FusedFFF: the module that replaces a confirmed FFF layer and runs its hardened descent.

forward(x) = op(x, weights) for the tree (``torch.ops.fffcompile.leaf_mlp_tree`` or
``neuron_tree``), and for form C the master leaf blended in plain torch:
y = s(k) * op(x) + (1 - s(k)) * (act(x W1 + b1) W2 + b2). The weights are Parameters, so the
hardened model can be fine-tuned (the op's backward reaches x and the used leaves).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations
from ..spec import FFFSpec


class FusedFFF(nn.Module):
    def __init__(self, spec: FFFSpec, where: str = ""):
        super().__init__()
        self.form, self.depth, self.activation, self.tie = spec.form, spec.depth, spec.activation, spec.tie
        self.master_activation = spec.master_activation
        self.source, self.where = spec.source, where
        for name in ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2", "out_weight",
                     "out_bias", "master_w1", "master_b1", "master_w2", "master_b2", "master_logit"):
            value = getattr(spec, name)
            self.register_parameter(name, None if value is None else nn.Parameter(value.detach().clone()))

    @property
    def spec(self) -> FFFSpec:
        tensors = {name: p.detach() for name, p in self.named_parameters(recurse=False)}
        return FFFSpec(self.form, self.depth, self.activation, tie=self.tie, source=self.source,
                       master_activation=self.master_activation, **tensors)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}" + (f", from {self.where}" if self.where else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.node_weight.dtype
        xw = x if x.dtype == weight_dtype else x.to(weight_dtype)
        if self.form == "leaf_mlp":
            y = torch.ops.fffcompile.leaf_mlp_tree(xw, self.node_weight, self.node_bias, self.leaf_w1, self.leaf_b1,
                                                   self.leaf_w2, self.leaf_b2, self.activation, self.tie)
            if self.master_w1 is not None:
                master = activations.apply(self.master_activation, xw @ self.master_w1 + self.master_b1) @ self.master_w2 + self.master_b2
                k = torch.sigmoid(self.master_logit.reshape(()))
                y = k * y + (1 - k) * master
        else:
            y = torch.ops.fffcompile.neuron_tree(xw, self.node_weight, self.node_bias, self.out_weight, self.out_bias,
                                                 self.activation, self.tie)
        return y if y.dtype == x.dtype else y.to(x.dtype)
