"""What optimize / export found, rewrote, left alone, and why.

``Report.rewritten`` holds one ``Rewritten`` entry per FFF replaced by the fused op: where it
was, its form, depth and trees, the exactness comparison against the original with hardened
decisions, and the fidelity against the soft original (leaf agreement, error quantiles).
``Report.left`` holds one ``Left`` entry per candidate that was not rewritten, each with the
reason (and, from graph frontends, the best near miss). ``str(report)`` is a table.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Optional

from .compare import Comparison


@dataclass(frozen=True)
class Fidelity:
    """How well the hard descent reproduces the soft original on the probe inputs.

    leaf_agreement: share of rows whose hard leaf is the soft form's heaviest leaf (1.0 for
    forms that are hard already). chosen_leaf_weight: mean soft weight mu of the hard leaf.
    rel_error_quantiles: the quantiles (50%, 90%, 99%, max) of per-row relative error
    |hard - soft| / |soft| (norms over the output features).
    """

    leaf_agreement: float
    chosen_leaf_weight: float
    rel_error_quantiles: tuple[float, float, float, float]
    comparison: Optional[Comparison] = None

    @property
    def trained_hard(self) -> bool:
        """False when the layer was clearly never trained to be hard: the hard leaf is often not the
        soft form's heaviest, or carries on average less than half of the soft mixture."""
        return self.leaf_agreement >= 0.8 and self.chosen_leaf_weight >= 0.5

    def summary(self) -> str:
        q = self.rel_error_quantiles
        return (f"leaf agreement {self.leaf_agreement:.1%}, chosen-leaf weight {self.chosen_leaf_weight:.2f}, "
                f"rel. error p50 {q[0]:.2g} p90 {q[1]:.2g} p99 {q[2]:.2g} max {q[3]:.2g}")


@dataclass(frozen=True)
class Rewritten:
    where: str
    form: str                     # 'A', 'B' or 'C'
    depth: int
    trees: int
    d_in: int
    d_out: int
    source: str                   # 'soft' or 'hard': what the original computed
    frontend: str                 # 'module', 'fx' or 'onnx'
    exactness: Comparison
    fidelity: Optional[Fidelity]
    speedup_bound: float          # soft MACs / hard MACs: the physical limit of the speedup
    description: str = ""
    warning: Optional[str] = None
    notes: tuple[str, ...] = ()

    @property
    def exactness_error(self) -> float:
        return self.exactness.max_rel_error

    @property
    def leaf_agreement(self) -> Optional[float]:
        return None if self.fidelity is None else self.fidelity.leaf_agreement

    @property
    def fidelity_quantiles(self) -> Optional[tuple[float, float, float, float]]:
        return None if self.fidelity is None else self.fidelity.rel_error_quantiles


@dataclass(frozen=True)
class Left:
    where: str
    reason: str
    near_miss: Optional[str] = None
    frontend: str = "module"


@dataclass
class Report:
    rewritten: list[Rewritten] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_check: Optional[dict[str, Comparison]] = None   # whole-model comparisons by name
    retargeted: int = 0       # fffcompile nodes already in an ONNX model whose target attributes were set

    @property
    def changed(self) -> bool:
        return bool(self.rewritten or self.retargeted)

    @property
    def warnings(self) -> list[str]:
        return [f"{r.where}: {r.warning}" for r in self.rewritten if r.warning]

    def to_dict(self) -> dict:
        def plain(value):
            if is_dataclass(value):
                return {k: plain(v) for k, v in asdict(value).items()}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value
        return plain({"rewritten": self.rewritten, "left": self.left, "notes": self.notes,
                      "model_check": self.model_check, "retargeted": self.retargeted})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        lines = []
        if self.rewritten:
            rows = [("where", "form", "depth", "trees", "in->out", "exact (max rel)", "leaf agree", "rel err p50/p99", "bound")]
            for r in self.rewritten:
                f = r.fidelity
                rows.append((r.where, r.form, str(r.depth), str(r.trees), f"{r.d_in}->{r.d_out}",
                             f"{'ok' if r.exactness.passed else 'FAIL'} {r.exactness.max_rel_error:.1e}",
                             "-" if f is None else f"{f.leaf_agreement:.1%}",
                             "-" if f is None else f"{f.rel_error_quantiles[0]:.1e}/{f.rel_error_quantiles[2]:.1e}",
                             f"{r.speedup_bound:.0f}x"))
            lines.append(f"rewritten: {len(self.rewritten)} FFF layer(s) to the fused descent op")
            lines += _table(rows)
        elif self.retargeted:
            lines.append(f"rewritten: nothing new ({self.retargeted} fffcompile node(s) already in the model, retargeted)")
        else:
            lines.append("rewritten: nothing (the model is returned unchanged)")
        for r in self.rewritten:
            for note in r.notes:
                lines.append(f"  note ({r.where}): {note}")
            if r.warning:
                lines.append(f"  WARNING ({r.where}): {r.warning}")
        if self.left:
            lines.append(f"left as is: {len(self.left)}")
            for entry in self.left:
                miss = f" (nearest: {entry.near_miss})" if entry.near_miss else ""
                lines.append(f"  {entry.where}: {entry.reason}{miss}")
        if self.model_check:
            lines.append("whole model:")
            for name, comparison in self.model_check.items():
                lines.append(f"  {name}: {comparison.summary()}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out
