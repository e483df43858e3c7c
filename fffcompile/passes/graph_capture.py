"""Capture a model as an ATen-level FX graph the graph frontend can search and rewrite.

Order of attempts:
1. ``torch.export.export(strict=False)`` with every dim of every tensor input marked
   ``Dim.AUTO`` (so batch and sequence stay symbolic where the model allows), then
   ``run_decompositions({})``: functionalisation only (in-place ``mul_``/``copy_`` into views
   become functional ops, ``no_grad`` higher-order wrappers are inlined), no op decomposed;
2. the same export with static shapes;
3. ``torch.fx.symbolic_trace`` (torch-level graph; for models export cannot follow).

The result is a ``GraphModule`` whose call signature is the model's. A model that no capture
can follow is a value (``CaptureFailed`` with every attempt's reason), never an exception.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import fx, nn


@dataclass
class Captured:
    module: fx.GraphModule
    how: str                 # "export (dynamic)", "export (static)" or "fx.symbolic_trace"


@dataclass
class CaptureFailed:
    reason: str


def _dynamic_shapes(inputs: tuple, kwargs: dict):
    def dims(value):
        if isinstance(value, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(value.dim())}
        if isinstance(value, (list, tuple)):
            return type(value)(dims(v) for v in value)
        if isinstance(value, dict):
            return {k: dims(v) for k, v in value.items()}
        return None
    return dims(tuple(inputs))


def capture(model: nn.Module, inputs: tuple, kwargs: Optional[dict] = None) -> Union[Captured, CaptureFailed]:
    kwargs = kwargs or {}
    reasons = []
    attempts = [("export (dynamic)", True), ("export (static)", False)]
    for how, dynamic in attempts:
        if dynamic and kwargs:
            continue   # dynamic_shapes for keyword inputs need the model's signature; static export covers them
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shapes = _dynamic_shapes(inputs, kwargs) if dynamic else None
                program = torch.export.export(model, tuple(inputs), kwargs, strict=False, dynamic_shapes=shapes)
                program = program.run_decompositions({})
                return Captured(program.module(), how)
        except Exception as error:   # third-party models fail export in many ways; each is a reason
            reasons.append(f"{how}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    try:
        return Captured(fx.symbolic_trace(model), "fx.symbolic_trace")
    except Exception as error:
        reasons.append(f"fx.symbolic_trace: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    return CaptureFailed("; ".join(reasons))
