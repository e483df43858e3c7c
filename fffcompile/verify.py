"""Verify: exactness against the hardened original, fidelity against the soft original.

- Exactness (never waived): the rewrite against the original with hardened decisions
  (every p_n replaced by its step), to float tolerance; rows whose path meets a decision within
  rounding of zero are excluded as ties and counted (``reference.near_ties``).
- Fidelity (reported, enforced only on request): the hard descent against the soft original
  on the user's example inputs: leaf agreement (the hard leaf is the soft form's heaviest
  leaf), the soft weight of the hard leaf, and quantiles of the per-row relative error
  ||hard - soft|| / ||soft||. A layer that was clearly never trained to be hard is told so
  in plain words with these figures (``fidelity_warning``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .compare import Comparison, compare, default_tolerance
from .report import Fidelity
from .spec import FFFSpec


def exactness(spec: FFFSpec, x: torch.Tensor, expected: torch.Tensor, actual: Optional[torch.Tensor] = None,
              atol: Optional[float] = None, rtol: Optional[float] = None) -> Comparison:
    """Compare ``actual`` (default: the spec's reference) with the hardened original's ``expected``.

    The absolute tolerance scales with the output's magnitude (max |expected|, at least 1).
    """
    if actual is None:
        actual = reference.hard(spec, x)
    default_atol, default_rtol = default_tolerance(expected.dtype)
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    return compare(actual, expected, atol=(default_atol if atol is None else atol) * scale,
                   rtol=default_rtol if rtol is None else rtol, exclude=reference.near_ties(spec, x))


def measure_fidelity(spec: FFFSpec, x: torch.Tensor, soft_out: torch.Tensor, hard_out: torch.Tensor) -> Fidelity:
    """Fidelity figures of the hard descent ``hard_out`` against the original soft output on x."""
    rows = x.reshape(-1, spec.d_in).shape[0]
    soft2 = soft_out.detach().reshape(rows, -1).double()
    hard2 = hard_out.detach().reshape(rows, -1).double()
    rel = (hard2 - soft2).norm(dim=1) / soft2.norm(dim=1).clamp_min(1e-12)
    if rows:
        q = torch.quantile(rel, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
        quantiles = (float(q[0]), float(q[1]), float(q[2]), float(rel.max()))
    else:
        quantiles = (0.0, 0.0, 0.0, 0.0)
    if spec.form == "leaf_mlp" and spec.depth > 0 and rows:
        mu = reference.leaf_weights(spec, x)
        leaf = reference.route(spec, x).leaf[:, 0]
        agreement = float((mu.argmax(1) == leaf).double().mean())
        chosen = float(mu.gather(1, leaf.unsqueeze(1)).mean())
    else:
        agreement, chosen = 1.0, 1.0
    return Fidelity(agreement, chosen, quantiles, compare(hard_out, soft_out))


def fidelity_warning(fidelity: Fidelity) -> Optional[str]:
    """Plain words for a layer that was never trained to be hard; None when it was."""
    if fidelity.trained_hard:
        return None
    q = fidelity.rel_error_quantiles
    return (f"this FFF looks never trained to be hard: on the example inputs its hard descent picks the soft "
            f"form's heaviest leaf for {fidelity.leaf_agreement:.0%} of rows (the chosen leaf carries "
            f"{fidelity.chosen_leaf_weight:.2f} of the mixture on average) and its outputs differ from the soft "
            f"outputs by {q[0]:.0%} (median, {q[2]:.0%} at p99). The optimized model computes the hard descent, "
            f"which is what an FFF means at inference; fine-tune with hardening (fffcompile.nn.FFF, "
            f"train_hardened=True or the hardening loss) before deploying, or pass min_leaf_agreement= to keep "
            f"such layers soft.")
