"""fffcompile: find trained Fast FeedForward trees in PyTorch and ONNX graphs and compile them
to one fused, gather-based descent op.

    fast = fffcompile.optimize(model, example_inputs); print(fast.report)

Importing fffcompile registers the ops ``torch.ops.fffcompile.*``; it never imports the
optional GPU backends (triton, tensorrt).
"""
from . import ops  # noqa: F401  (registers torch.ops.fffcompile.*)
from .compare import Comparison, compare
from .errors import (FFFCompileError, InternalError, InvalidModelError, InvalidSpecError, MissingDependencyError,
                     UserError, VerificationError)
from .optimize import optimize
from .report import Fidelity, Left, Report, Rewritten
from .spec import FFFSpec

__version__ = "0.1.0"


def export(model, example_inputs, path, **options):
    """Export ``model`` with its FFF layers fused to an ONNX file (``fffcompile.onnx.export.export``)."""
    from .onnx.export import export as _export
    return _export(model, example_inputs, path, **options)


__all__ = ["optimize", "export", "FFFSpec", "Report", "Rewritten", "Left", "Fidelity", "Comparison", "compare",
           "FFFCompileError", "UserError", "InvalidSpecError", "InvalidModelError", "MissingDependencyError",
           "VerificationError", "InternalError"]
