"""Confirm an extracted spec by numbers on the cut-out candidate, before any rewrite.

The cut-out runs on probe rows (the recorded real inputs of the candidate, then random rows
with the same per-feature mean and spread) in the model's dtype, with its soft decisions
hardened (s(z) -> [z >= 0], log s(z) -> log [z >= 0]); hard candidates run as they are.
``reference.hard(spec, x)`` must reproduce it within float tolerance (rows at a decision
within rounding of zero are ties, excluded and counted; more than half of them refuses).

Fidelity (the hard descent against the soft candidate) is measured on the real rows.
A spec that does not reproduce the graph is refused with the comparison as the near miss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import reference
from ..compare import Comparison, compare
from ..report import Fidelity
from ..spec import FFFSpec
from ..verify import exactness, measure_fidelity
from .graph_anchor import Candidate
from .graph_cutout import Cutout

_PROBE_ROWS = 512


@dataclass
class GraphConfirmed:
    spec: FFFSpec
    exactness: Comparison
    fidelity: Fidelity
    per_row_loop: bool = False         # read from B copies of one per-row program (a static batch)


@dataclass
class GraphRefused:
    reason: str
    near_miss: Optional[str] = None
    needed: float = float("inf")


def probes(x_rows: torch.Tensor, seed: int) -> torch.Tensor:
    rows = x_rows.float()
    mean = rows.mean(0)
    std = rows.std(0, unbiased=False) if rows.shape[0] > 1 else rows.abs().mean(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    noise = torch.randn(_PROBE_ROWS, rows.shape[1], generator=torch.Generator().manual_seed(seed)) * std + mean
    return torch.cat([x_rows, noise.to(x_rows.dtype)])


def confirm(cand: Candidate, cut: Cutout, spec: FFFSpec, x_rows: torch.Tensor, seed: int = 0) -> Union[GraphConfirmed, GraphRefused]:
    dtype = x_rows.dtype
    spec = spec.to(dtype)
    X = probes(x_rows, seed)
    harden = {d: "ge" for d in cand.decisions} if cand.kind == "soft" else {}
    try:
        expected = cut.run_rows(X, harden=harden)
    except Exception as error:     # the cut-out of a third-party graph may refuse probe batches
        return GraphRefused(f"the candidate failed on probe inputs ({type(error).__name__}: {error})")
    if expected.shape != (X.shape[0], spec.d_out):
        return GraphRefused(f"the candidate returns {tuple(expected.shape[1:])} per row, the spec {spec.d_out}")
    actual = reference.hard(spec, X)
    result = exactness(spec, X, expected.to(actual.dtype), actual=actual)
    if not result.passed or result.ties_excluded >= X.shape[0] // 2:
        return GraphRefused("the extracted spec does not reproduce the candidate with hardened decisions",
                            f"{spec.describe()}: {result.summary()}", result.needed_rtol)
    real = x_rows
    hard_real = reference.hard(spec, real)
    soft_real = cut.run_rows(real) if harden else expected[:real.shape[0]]
    source = "soft" if harden and not bool(compare(hard_real, soft_real.to(hard_real.dtype))) else "hard"
    spec = spec.replace(source=source)
    fidelity = measure_fidelity(spec, real, soft_real.to(hard_real.dtype), hard_real)
    if not harden:      # the graph descends already: there is no soft mixture to agree with
        fidelity = dataclasses.replace(fidelity, leaf_agreement=1.0, chosen_leaf_weight=1.0)
    return GraphConfirmed(spec, result, fidelity)
