"""Harden a module's own soft forward: every data-dependent sigmoid becomes a step.

Under ``hardened_sigmoids()``, s(z) -> [z >= 0] and log s(z) -> 0 or -1e4 (log [z >= 0], finite so
that a path sum written as a matmul with a 0/1 path matrix never meets 0 * -inf), for
torch.sigmoid, Tensor.sigmoid, torch.special.expit, F.sigmoid, nn.Sigmoid and F.logsigmoid.
A soft FFF evaluated so is its hard descent (FORMS.md: "hard = soft with every p_n replaced by
the step"), which is the exact oracle a rewrite is confirmed against.

Must not fire on a sigmoid of a learned scalar or vector that does not depend on the rows
(form C's blend s(k), a gate parameter): only arguments with at least ``rows`` elements are
hardened, where ``rows`` is the number of input rows of the probe batch.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_SIGMOIDS = {torch.sigmoid, torch.Tensor.sigmoid, torch.special.expit, torch.nn.functional.sigmoid}
_LOG_SIGMOIDS = {torch.nn.functional.logsigmoid}


class hardened_sigmoids(TorchFunctionMode):
    def __init__(self, rows: int):
        super().__init__()
        self.rows = max(int(rows), 2)
        self.hardened = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _SIGMOIDS or func in _LOG_SIGMOIDS) and args and isinstance(args[0], torch.Tensor) \
                and args[0].numel() >= self.rows and args[0].is_floating_point():
            z = args[0]
            self.hardened += 1
            step = (z >= 0).to(z.dtype)
            return (step - 1) * 1.0e4 if func in _LOG_SIGMOIDS else step
        return func(*args, **kwargs)
