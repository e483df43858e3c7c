"""optimize(..., weights="bf16"): the fused layers run on a bfloat16 copy of their tree weights.

Math: each fused layer computes reference.hard of its spec with the tree's weights rounded to
bfloat16 (W -> bf16(W), x, the sums and the output in float32). That is not the hardened original
any more: the rounding moves every logit by about 2^-8 |x| . |W|, so outputs differ by ~1e-3
relative, and rows whose decision margin is that small take another path (a decision flip), which
changes their output by a whole leaf. verify therefore reports, next to the float32 exactness check
(which still decides whether the rewrite is kept), the bf16 model against the hardened original with
tolerances for bfloat16 weights (compare.default_tolerance(bfloat16): atol 2e-2 x max|y|, rtol 2e-2)
and, per layer, the share of rows on the example inputs whose path differs from the float32 path.
A failure of that comparison is reported (a warning), never a reason to undo the rewrite: the user
asked for the rounding. It must not be applied to layers that are not float32 (they keep their weights).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import reference
from .compare import Comparison, compare, default_tolerance
from .runtime.cpu_kernel import WEIGHT_MODES as MODES
CHECK_NAME = "bf16 weights vs the hardened original"


def fused_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .runtime import FusedFFF
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FusedFFF)]


def apply(model: nn.Module, weights: Optional[str]) -> list[str]:
    """Set the weight mode on every fused layer; the notes say which layers kept their weights and why."""
    notes = []
    for name, layer in fused_layers(model):
        if weights == "bf16" and layer.node_weight.dtype != torch.float32:
            notes.append(f"{name or 'model'}: weights are {layer.node_weight.dtype}, kept as they are (bf16 copy needs float32)")
            continue
        layer.set_weights(weights)
    if weights is not None and not any(layer.weights == weights for _, layer in fused_layers(model)):
        notes.append(f"weights={weights!r}: no fused layer module takes it (none, or none in float32); the weights are as trained")
    return notes


def decision_flips(model: nn.Module, run) -> dict[str, tuple[int, int]]:
    """Per bf16 layer: (rows whose path differs from the float32 path, rows) on the inputs `run()` feeds it."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, layer in fused_layers(model):
        if layer.weights == "bf16":
            hooks.append(layer.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach())))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    layers = dict(fused_layers(model))
    flips = {}
    for name, xs in seen.items():
        spec = layers[name].spec
        rounded = spec.replace(**{n: layers[name]._tree(n).detach() for n in
                                  ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2", "out_weight", "out_bias")
                                  if getattr(spec, n) is not None})
        changed = rows = 0
        for x in xs:
            a, b = reference.route(spec, x).leaf, reference.route(rounded, x).leaf
            changed += int((a != b).any(-1).sum())
            rows += a.shape[0]
        flips[name] = (changed, rows)
    return flips


def check(optimized_out: torch.Tensor, hardened_out: torch.Tensor, flips: dict[str, tuple[int, int]]) -> tuple[Comparison, list[str]]:
    """The bf16 model's output against the hardened original with bfloat16-weight tolerances, and notes."""
    atol, rtol = default_tolerance(torch.bfloat16)
    result = compare(optimized_out, hardened_out, atol=atol * max(1.0, float(hardened_out.abs().max())), rtol=rtol)
    notes = []
    for name, (changed, rows) in flips.items():
        notes.append(f"bf16 weights: {name or 'model'}: {changed}/{rows} rows take another path than with float32 "
                     f"weights (decision flips, {changed / max(rows, 1):.2%})")
    if not result:
        notes.append("bf16 weights: WARNING the bf16 model is outside the bf16 tolerances of the hardened original; "
                     "optimize without weights='bf16' for the exact model")
    return result, notes
