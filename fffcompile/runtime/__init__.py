"""Lowerings of the fused op: the module that runs it and the kernels registered against it.

Optional GPU backends (triton, tensorrt) are imported lazily, never here.
"""
from .fused_module import FusedFFF

__all__ = ["FusedFFF"]
