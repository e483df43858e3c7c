"""Harden a module's own soft forward: every data-dependent sigmoid becomes a step.

Under ``hardened_sigmoids()``, s(z) -> [z >= 0] and log s(z) -> 0 or -1e4 (log [z >= 0], finite so
that a path sum written as a matmul with a 0/1 path matrix never meets 0 * -inf), for
torch.sigmoid, Tensor.sigmoid, torch.special.expit, F.sigmoid, nn.Sigmoid and F.logsigmoid.
A soft FFF evaluated so is its hard descent (FORMS.md: "hard = soft with every p_n replaced by
the step"), which is the exact oracle a rewrite is confirmed against.

Must not fire on a sigmoid of a learned scalar or vector that does not depend on the rows
(form C's blend s(k), a gate parameter): only arguments with at least ``rows`` elements are
hardened, where ``rows`` is the number of input rows of the probe batch.

Nor on a sigmoid that is the leaves' activation (a spec whose activation is "sigmoid"): with
``leaf_preactivations`` (x -> (rows, F), the reading's leaf pre-activations x W1 + b1, or a neuron
tree's x W_in^T + b_in), a sigmoid whose argument holds only those values, row by row (the row
axis found from the shape: leading dims, or the one axis of size rows; else all rows at once),
within float32 rounding, is computed as is. Chance agreement of node logits with all of them is
negligible, and a wrong call only costs a refusal: the outputs must still match the reference.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_SIGMOIDS = {torch.sigmoid, torch.Tensor.sigmoid, torch.special.expit, torch.nn.functional.sigmoid}
_LOG_SIGMOIDS = {torch.nn.functional.logsigmoid}


def _row_major(z: torch.Tensor, rows: int):
    """z as (rows, -1) when its leading dims, or exactly one axis, hold the rows; else None."""
    k, prod = 0, 1
    while k < z.dim() and prod < rows:
        prod *= z.shape[k]
        k += 1
    if prod == rows:
        return z.reshape(rows, -1)
    axes = [a for a in range(z.dim()) if z.shape[a] == rows]
    return z.movedim(axes[0], 0).reshape(rows, -1) if len(axes) == 1 else None


def among(z: torch.Tensor, values: torch.Tensor) -> bool:
    """Every element of z is, within z's rounding (relative to the values' scale), one of its row's ``values`` (rows, F)."""
    if z.numel() == 0:
        return False
    rel = 1e-2 if z.dtype in (torch.float16, torch.bfloat16) else 1e-5
    ref, zz = values.double(), z.detach().double()
    per_row = _row_major(zz, ref.shape[0])
    if per_row is None:
        ref, per_row = ref.reshape(1, -1), zz.reshape(1, -1)
    ordered = ref.sort(1).values.contiguous()
    idx = torch.searchsorted(ordered, per_row.contiguous())
    hi = ordered.gather(1, idx.clamp(max=ordered.shape[1] - 1))
    lo = ordered.gather(1, (idx - 1).clamp(min=0))
    gap = torch.minimum((per_row - hi).abs(), (per_row - lo).abs())
    return bool((gap <= rel * (1.0 + float(ref.abs().max()))).all())


class hardened_sigmoids(TorchFunctionMode):
    def __init__(self, rows: int, leaf_preactivations: "torch.Tensor | None" = None):
        super().__init__()
        self.rows = max(int(rows), 2)
        self.hardened = 0
        self.leaf_preactivations = leaf_preactivations

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _SIGMOIDS or func in _LOG_SIGMOIDS) and args and isinstance(args[0], torch.Tensor) \
                and args[0].numel() >= self.rows and args[0].is_floating_point():
            z = args[0]
            if func in _SIGMOIDS and self.leaf_preactivations is not None and among(z, self.leaf_preactivations):
                return func(*args, **kwargs)          # the leaves' activation, not a decision
            self.hardened += 1
            step = (z >= 0).to(z.dtype)
            return (step - 1) * 1.0e4 if func in _LOG_SIGMOIDS else step
        return func(*args, **kwargs)
