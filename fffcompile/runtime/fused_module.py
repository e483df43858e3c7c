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
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from .. import activations
from ..spec import FFFSpec
from . import cpu_kernel

_WEIGHTS = ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2", "out_weight", "out_bias",
            "master_w1", "master_b1", "master_w2", "master_b2", "master_logit")


class FusedFFF(nn.Module):
    def __init__(self, spec: FFFSpec, where: str = ""):
        super().__init__()
        self.form, self.depth, self.activation, self.tie = spec.form, spec.depth, spec.activation, spec.tie
        self.master_activation = spec.master_activation
        self.source, self.where = spec.source, where
        for name in _WEIGHTS:
            value = getattr(spec, name)
            self.register_parameter(name, None if value is None else nn.Parameter(value.detach().clone()))
        self._drop_fast()

    # ----------------------------------------------------------------- the C++ handle (fast path)
    def _drop_fast(self):
        object.__setattr__(self, "_fast", None)        # None: not tried; False: refused; else the handle
        object.__setattr__(self, "_fast_dtype", None)
        object.__setattr__(self, "_fast_master", None)
        object.__setattr__(self, "_fast_weights", None)

    def _make_fast(self):
        if self.form == "leaf_mlp":
            handle = cpu_kernel.prepare(self.form, self.node_weight, self.node_bias, self.leaf_w1, self.leaf_b1,
                                        self.leaf_w2, self.leaf_b2, self.activation, self.tie)
        else:
            handle = cpu_kernel.prepare(self.form, self.node_weight, self.node_bias, self.out_weight, self.out_bias,
                                        None, None, self.activation, self.tie)
        object.__setattr__(self, "_fast", handle if handle is not None else False)
        object.__setattr__(self, "_fast_dtype", self.node_weight.dtype)
        tree = (("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2") if self.form == "leaf_mlp"
                else ("node_weight", "node_bias", "out_weight", "out_bias"))
        object.__setattr__(self, "_fast_weights", tuple(getattr(self, name) for name in tree))
        object.__setattr__(self, "_fast_master", self.master_w1 is not None)

    def _apply(self, fn, *args, **kwargs):   # .to(), .cuda(), .half(), ...: weights may move or change dtype
        self._drop_fast()
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):      # a replaced parameter (load_state_dict(assign=True), ...)
        if name in _WEIGHTS:
            self._drop_fast()
        super().__setattr__(name, value)

    def __getstate__(self):                  # the handle is a process-local C++ object
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state, _fast=None, _fast_dtype=None, _fast_master=None, _fast_weights=None)
        return state

    @property
    def spec(self) -> FFFSpec:
        tensors = {name: p.detach() for name, p in self.named_parameters(recurse=False)}
        return FFFSpec(self.form, self.depth, self.activation, tie=self.tie, source=self.source,
                       master_activation=self.master_activation, **tensors)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}" + (f", from {self.where}" if self.where else "")

    def _run_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The tree through the C++ handle; under autograd as a Function whose backward is the op's."""
        if not torch.is_grad_enabled() or not (x.requires_grad or any(w is not None and w.requires_grad
                                                                      for w in self._fast_weights)):
            return self._fast(x)
        return _FastTree.apply(self._fast, self.form, self.activation, self.tie, x, *self._fast_weights)

    def __call__(self, *args, **kwargs):
        # The C++ handle straight from the call when nothing a Module call provides is in use (no hooks,
        # no compiled call, no tracing, no master leaf): saves nn.Module's call machinery, about a
        # microsecond, a fifth of a batch-1 call. Anything else, or an input the handle refuses (wrong
        # device, dtype or width: it raises), takes the ordinary path.
        fast = self._fast
        if (fast and not self._fast_master and len(args) == 1 and not kwargs and type(args[0]) is torch.Tensor
                and self._compiled_call_impl is None
                and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                         or _module._global_forward_hooks or _module._global_forward_pre_hooks
                         or _module._global_backward_hooks or _module._global_backward_pre_hooks)
                and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None):
            try:
                return self._run_fast(args[0])
            except RuntimeError:
                pass
        return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if (fast is not False and type(x) is torch.Tensor and x.is_cpu
                and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None):
            if fast is None:
                self._make_fast()
                fast = self._fast
            if fast and x.dtype == self._fast_dtype:
                try:
                    y = self._run_fast(x)
                except RuntimeError:   # an input the handle refuses: the op says why below
                    y = None
                if y is not None:
                    if not self._fast_master:
                        return y
                    master = activations.apply(self.master_activation, x @ self.master_w1 + self.master_b1) @ self.master_w2 + self.master_b2
                    k = torch.sigmoid(self.master_logit.reshape(()))
                    return k * y + (1 - k) * master
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


class _FastTree(torch.autograd.Function):
    """The C++ handle under autograd: forward = handle(x), backward = the op's own formula (ops.py)."""

    @staticmethod
    def forward(ctx, handle, form, activation, tie, x, *weights):
        ctx.form, ctx.activation, ctx.tie = form, activation, tie
        ctx.linear = form == "leaf_mlp" and weights[4] is None
        ctx.save_for_backward(x, *weights)
        return handle(x)

    @staticmethod
    def backward(ctx, grad):
        from .. import ops
        grads = (ops._leaf_mlp_backward if ctx.form == "leaf_mlp" else ops._neuron_backward)(ctx, grad)
        return (None, None, None, None) + tuple(grads[:-2])
