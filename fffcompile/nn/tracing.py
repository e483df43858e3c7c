"""Whether the current forward runs under a graph capture (dynamo, export, fx).

Layers keep side statistics (for auxiliary losses) only in plain eager training; under a
capture such a side effect would leak traced values or break the capture.
"""
import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


def is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or is_fx_symbolic_tracing()
