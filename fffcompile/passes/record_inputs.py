"""Record what chosen submodules receive and return during one forward of the whole model.

The module frontend needs each candidate's real input width, output width and activations
(probe rows drawn from the user's own data make the fidelity figures meaningful).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Calls:
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def single_tensor_calls(self) -> bool:
        """Every call was module(x) with one tensor and returned one tensor."""
        return bool(self.args) and all(len(a) == 1 and isinstance(a[0], torch.Tensor) and not k
                                       and isinstance(o, torch.Tensor)
                                       for a, k, o in zip(self.args, self.kwargs, self.outputs))


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def record_calls(model: nn.Module, example_inputs: tuple, modules: dict[str, nn.Module],
                 example_kwargs: dict | None = None) -> dict[str, Calls]:
    calls = {name: Calls() for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, kwargs, output, name=name):
            calls[name].args.append(_detach(args))
            calls[name].kwargs.append(_detach(kwargs))
            calls[name].outputs.append(_detach(output))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return calls
