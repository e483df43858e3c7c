"""FusedFFF: the module that replaces a confirmed FFF layer and runs its hardened descent.

forward(x) = op(x, weights) for the tree (``torch.ops.fffcompile.leaf_mlp_tree`` or
``neuron_tree``), and for form C the master leaf blended in plain torch:
y = s(k) * op(x) + (1 - s(k)) * (act(x W1 + b1) W2 + b2). The weights are Parameters, so the
hardened model can be fine-tuned (the op's backward reaches x and the used leaves).

Fast path: in CPU inference (autograd off, a plain ``torch.Tensor`` of the weights' dtype, not
under torch.compile, export or jit tracing) the tree runs through a C++ handle that holds the
weights (``cpu_kernel.prepare``), skipping the dispatcher: one C++ call per forward. The handle
is the same kernel the op's CPU implementation calls, so the numbers are identical; it is built
on the first such call and dropped when the parameters are moved, cast or replaced. For form B
the handle also keeps a packed copy of the node and output rows (the layer's size again),
rebuilt when either changes. ``__call__`` goes to the handle directly when no hook, compiled
call or tracing is involved (saving nn.Module's call machinery); otherwise ``forward`` runs.
The machinery is shared with ``fffcompile.nn.FFF`` / ``NeuronTree``: ``fast_path.FastTree``.

weights="bf16" (``optimize(..., weights="bf16")``): the tree's weights are used rounded to
bfloat16 (x, the sums and the output stay float32; form C's master leaf stays as trained). The
Parameters stay float32; the C++ handle keeps a bfloat16 copy (half the weight traffic, which bounds
the kernel at large batch), rebuilt when a parameter changes; every other path (autograd through
the op, no kernel) runs the op on the weights rounded to bfloat16 and back, the same numbers up to
float32 summation order. Gradients flow to the float32 parameters as if the rounding were the
identity (straight through).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import activations
from ..spec import FFFSpec
from . import cpu_kernel
from .fast_path import FastTree

_WEIGHTS = ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2", "out_weight", "out_bias",
            "master_w1", "master_b1", "master_w2", "master_b2", "master_logit")


class FusedFFF(FastTree, nn.Module):
    _FAST_WATCH = frozenset(_WEIGHTS)

    def __init__(self, spec: FFFSpec, where: str = "", weights: Optional[str] = None):
        super().__init__()
        if weights not in cpu_kernel.WEIGHT_MODES:
            raise ValueError(f"weights must be one of {cpu_kernel.WEIGHT_MODES}, got {weights!r}")
        if weights == "bf16" and spec.dtype != torch.float32:
            raise ValueError(f"weights='bf16' needs float32 weights, the layer's are {spec.dtype}")
        self.weights = weights
        self.form, self.depth, self.activation, self.tie = spec.form, spec.depth, spec.activation, spec.tie
        self.master_activation = spec.master_activation
        self.source, self.where = spec.source, where
        for name in _WEIGHTS:
            value = getattr(spec, name)
            # a contiguous copy: a spec read from a Linear may hold transposed views, and every
            # backend (the C++ kernel above all) reads rows
            self.register_parameter(name, None if value is None else
                                    nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format)))
        self._drop_fast()

    # ----------------------------------------------------------------- the C++ handle (fast_path.FastTree)
    def _fast_config(self):
        tree = ((self.node_weight, self.node_bias, self.leaf_w1, self.leaf_b1, self.leaf_w2, self.leaf_b2)
                if self.form == "leaf_mlp" else (self.node_weight, self.node_bias, self.out_weight, self.out_bias))
        return self.form, self.activation, self.tie, self.master_w1 is None, tree

    def _fast_weights_mode(self):
        return self.weights

    def set_weights(self, weights: Optional[str]):
        """Switch the weight mode (None: as trained; "bf16": the reduced-precision copy)."""
        if weights not in cpu_kernel.WEIGHT_MODES:
            raise ValueError(f"weights must be one of {cpu_kernel.WEIGHT_MODES}, got {weights!r}")
        if weights == "bf16" and self.node_weight.dtype != torch.float32:
            raise ValueError(f"weights='bf16' needs float32 weights, the layer's are {self.node_weight.dtype}")
        self.weights = weights
        self._drop_fast()
        return self

    def _tree(self, name: str):
        """A tree weight as the op uses it: rounded to bfloat16 and back with weights='bf16'."""
        value = getattr(self, name)
        if value is None or self.weights is None:
            return value
        return value + (cpu_kernel.round_weight(value.detach(), self.weights) - value.detach())  # straight through

    @property
    def spec(self) -> FFFSpec:
        tensors = {name: p.detach() for name, p in self.named_parameters(recurse=False)}
        return FFFSpec(self.form, self.depth, self.activation, tie=self.tie, source=self.source,
                       master_activation=self.master_activation, **tensors)

    def extra_repr(self) -> str:
        return (f"{self.spec.describe()}" + (f", weights {self.weights}" if self.weights else "")
                + (f", from {self.where}" if self.where else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fast_tree(x)
        if y is not None:
            if self.master_w1 is None:
                return y
            master = activations.apply(self.master_activation, x @ self.master_w1 + self.master_b1) @ self.master_w2 + self.master_b2
            k = torch.sigmoid(self.master_logit.reshape(()))
            return k * y + (1 - k) * master
        weight_dtype = self.node_weight.dtype
        xw = x if x.dtype == weight_dtype else x.to(weight_dtype)
        t = self._tree
        if self.form == "leaf_mlp":
            y = torch.ops.fffcompile.leaf_mlp_tree(xw, t("node_weight"), t("node_bias"), t("leaf_w1"), t("leaf_b1"),
                                                   t("leaf_w2"), t("leaf_b2"), self.activation, self.tie)
            if self.master_w1 is not None:
                master = activations.apply(self.master_activation, xw @ self.master_w1 + self.master_b1) @ self.master_w2 + self.master_b2
                k = torch.sigmoid(self.master_logit.reshape(()))
                y = k * y + (1 - k) * master
        else:
            y = torch.ops.fffcompile.neuron_tree(xw, t("node_weight"), t("node_bias"), t("out_weight"), t("out_bias"),
                                                 self.activation, self.tie)
        return y if y.dtype == x.dtype else y.to(x.dtype)

