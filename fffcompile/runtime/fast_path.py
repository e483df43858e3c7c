"""FastTree: the C++ fast path shared by every module whose forward runs the fused tree op.

A module that mixes it in computes tree(x) = op(x, weights) (``leaf_mlp_tree`` or
``neuron_tree``) either through the dispatcher or, in CPU eager mode, through a C++ handle
holding the weights (``cpu_kernel.prepare``): the same kernel the op's CPU implementation calls,
so the numbers are identical, without the dispatcher's ~25 us per call.

The handle must NOT be used (the op runs, so that captures record it) under torch.compile,
torch.export, jit tracing, FX symbolic tracing, for anything but a plain CPU ``torch.Tensor`` of
the weights' dtype, or when ``_fast_allowed()`` says no (``nn.FFF`` / ``NeuronTree`` in training
mode, whose forward is another formula). Under autograd the handle runs inside a Function whose
backward is the op's own formula (ops.py), so gradients equal the op's.

The handle keeps the very parameter tensors, so in-place updates (optimizer steps, ``.data =``)
are seen; it is dropped when the parameters are moved or cast (``_apply``) or replaced
(``__setattr__``), and never pickled or deep-copied. ``__call__`` goes to the handle directly,
skipping nn.Module's call machinery, when ``forward`` would return tree(x) unchanged
(``_fast_direct``) and no hook, compiled call or tracing is involved.

A class mixing it in sets ``_FAST_WATCH`` (attribute names whose replacement drops the handle) and
defines ``_fast_config() -> (form, activation, tie, direct, weights)``, weights the tree's tensors in
the op's argument order (form A: node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2; form B:
node_weight, node_bias, out_weight, out_bias), direct whether forward returns tree(x) unchanged; its forward calls ``self._fast_tree(x)``,
which is the tree's output or None (then it runs the op itself).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.modules import module as _module

from . import cpu_kernel

_TENSOR = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling


class FastTree:
    _FAST_WATCH: frozenset = frozenset()
    _FAST_STATE = ("_fast", "_fast_dtype", "_fast_direct", "_fast_weights", "_fast_form")

    def _fast_config(self):
        raise NotImplementedError

    def _fast_weights_mode(self):
        """None (the weights as they are) or "bf16" (the handle keeps a bfloat16 copy: cpu_kernel.prepare)."""
        return None

    def _fast_allowed(self) -> bool:
        """Whether forward computes the tree op at all in the current mode (e.g. eval only)."""
        return True

    # ---------------------------------------------------------------- the handle's life cycle
    def _drop_fast(self):
        object.__setattr__(self, "_fast", None)        # None: not tried; False: refused; else the handle
        object.__setattr__(self, "_fast_dtype", None)
        object.__setattr__(self, "_fast_direct", False)
        object.__setattr__(self, "_fast_weights", None)
        object.__setattr__(self, "_fast_form", None)

    def _make_fast(self):
        form, activation, tie, direct, weights = self._fast_config()
        weights = tuple(weights)
        padded = weights + (None,) * (6 - len(weights))
        handle = cpu_kernel.prepare(form, *padded, activation, tie, weights=self._fast_weights_mode())
        object.__setattr__(self, "_fast", handle if handle is not None else False)
        object.__setattr__(self, "_fast_dtype", weights[0].dtype)
        object.__setattr__(self, "_fast_weights", weights)
        object.__setattr__(self, "_fast_direct", bool(direct))
        object.__setattr__(self, "_fast_form", (form, activation, tie))

    def _apply(self, fn, *args, **kwargs):   # .to(), .cuda(), .half(), ...: weights may move or change dtype
        self._drop_fast()
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):      # a replaced parameter (load_state_dict(assign=True), ...)
        if name in self._FAST_WATCH:
            self._drop_fast()
        super().__setattr__(name, value)

    def __getstate__(self):                  # the handle is a process-local C++ object
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state, **{name: None for name in self._FAST_STATE})
        state["_fast_direct"] = False
        return state

    # ---------------------------------------------------------------- running it
    def _run_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The tree through the C++ handle; under autograd as a Function whose backward is the op's."""
        if not torch.is_grad_enabled() or not (x.requires_grad or any(w is not None and w.requires_grad
                                                                      for w in self._fast_weights)):
            return self._fast(x)
        form, activation, tie = self._fast_form
        return _FastTree.apply(self._fast, form, activation, tie, x, *self._fast_weights)

    def _fast_tree(self, x) -> Optional[torch.Tensor]:
        """tree(x) through the handle (built on first use), or None where the op must run instead."""
        fast = self._fast
        if (fast is False or type(x) is not torch.Tensor or not x.is_cpu or not self._fast_allowed()
                or torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None):
            return None
        if fast is None:
            self._make_fast()
            fast = self._fast
        if not fast or x.dtype != self._fast_dtype:
            return None
        try:
            return self._run_fast(x)
        except RuntimeError:   # an input the handle refuses: the op says why
            return None

    def __call__(self, *args, **kwargs):
        # The handle straight from the call when nothing a Module call provides is in use (no hooks,
        # no compiled call, no tracing) and forward would return the tree unchanged: saves nn.Module's
        # call machinery, a few microseconds of a batch-1 call (the checks are ordered cheapest
        # first and bound to module globals: each costs ~0.1 us). Anything else, or an input the
        # handle refuses (wrong device, dtype or width: it raises), takes the ordinary path.
        fast = self._fast
        if fast and self._fast_direct and len(args) == 1 and not kwargs:
            x = args[0]
            if (type(x) is _TENSOR and self._compiled_call_impl is None and self._fast_allowed()
                    and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                             or _module._global_forward_hooks or _module._global_forward_pre_hooks
                             or _module._global_backward_hooks or _module._global_backward_pre_hooks)
                    and _tracing_state() is None and not _is_compiling()):
                try:
                    return fast(x) if not _grad_enabled() else self._run_fast(x)
                except RuntimeError:
                    pass
        return super().__call__(*args, **kwargs)


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
