"""Comparison results as values (in the manner of Polygraphy's comparator).

``compare(actual, expected, atol, rtol)`` passes where every element satisfies
|actual - expected| <= atol + rtol * |expected|, and carries what would have been needed:

    needed_atol = max(|a - e| - rtol * |e|)      (with the given rtol)
    needed_rtol = max((|a - e| - atol) / |e|)    (with the given atol)

Rows marked in ``exclude`` (``reference.near_ties``: a decision on the row's path within
rounding of zero) are left out: there two correct implementations may choose different leaves
because their logits differ by rounding, which is a tie, not an error. They are counted in
``ties_excluded``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Comparison:
    passed: bool
    atol: float
    rtol: float
    max_abs_error: float
    max_rel_error: float
    needed_atol: float
    needed_rtol: float
    rows: int
    mismatched_rows: int
    ties_excluded: int = 0

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        ties = f", {self.ties_excluded} near-tie rows excluded" if self.ties_excluded else ""
        return (f"{verdict}: max abs {self.max_abs_error:.3g}, max rel {self.max_rel_error:.3g} "
                f"(atol {self.atol:g}, rtol {self.rtol:g}; needed atol {self.needed_atol:.3g} or rtol {self.needed_rtol:.3g}; "
                f"{self.mismatched_rows}/{self.rows} rows off{ties})")

    def __str__(self) -> str:
        return self.summary()


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing two computations of the same function in ``dtype``."""
    return {
        torch.float64: (1e-10, 1e-9),
        torch.float32: (1e-5, 1e-4),
        torch.bfloat16: (2e-2, 2e-2),
        torch.float16: (2e-3, 4e-3),
    }.get(dtype, (1e-5, 1e-4))


def compare(actual: torch.Tensor, expected: torch.Tensor, atol: Optional[float] = None, rtol: Optional[float] = None,
            exclude: Optional[torch.Tensor] = None) -> Comparison:
    """Compare two (..., d) outputs row by row; rows are the flattened leading dims."""
    if actual.shape != expected.shape:
        raise ValueError(f"cannot compare shapes {tuple(actual.shape)} and {tuple(expected.shape)}")
    default_atol, default_rtol = default_tolerance(expected.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    width = expected.shape[-1] if expected.dim() else 1
    a = actual.detach().reshape(-1, width).double()
    e = expected.detach().reshape(-1, width).double()
    keep = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    if exclude is not None:
        keep = ~exclude.reshape(-1).to(a.device)
    a, e = a[keep], e[keep]
    ties = int((~keep).sum())
    if a.numel() == 0:
        return Comparison(True, atol, rtol, 0.0, 0.0, 0.0, 0.0, 0, 0, ties)
    diff = (a - e).abs()
    scale = e.abs()
    finite = torch.isfinite(a) & torch.isfinite(e)
    same_nonfinite = (~finite) & ((a == e) | (torch.isnan(a) & torch.isnan(e)))
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
    diff = torch.where(finite | same_nonfinite, diff, torch.full_like(diff, float("inf")))
    # (a NaN or inf expected value makes the bound NaN or inf: only equal non-finites pass)
    bad = ~((finite & (diff <= atol + rtol * scale)) | same_nonfinite)
    rel = diff / scale.clamp_min(torch.finfo(torch.float64).tiny)
    needed_rtol = ((diff - atol).clamp_min(0) / scale.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    return Comparison(
        passed=not bool(bad.any()),
        atol=atol, rtol=rtol,
        max_abs_error=diff.max().item(),
        max_rel_error=rel.max().item(),
        needed_atol=(diff - rtol * scale).clamp_min(0).max().item(),
        needed_rtol=needed_rtol,
        rows=a.shape[0],
        mismatched_rows=int(bad.any(-1).sum()),
        ties_excluded=ties,
    )
