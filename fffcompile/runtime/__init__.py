"""Lowerings of the fused op: the module that runs it and the kernels registered against it.

``cpu_kernel`` registers the ops' CPU implementation (a C++ kernel built on its first call,
never at import). Optional GPU backends (triton, tensorrt) are imported lazily, never here: ``cuda_dispatch``
registers the ops' CUDA implementation and imports triton on the first call with CUDA tensors.
"""
from . import cpu_kernel  # noqa: F401  (registers the CPU kernels of torch.ops.fffcompile.*)
from . import cuda_dispatch  # noqa: F401  (registers the CUDA kernels of torch.ops.fffcompile.*)
from .fused_module import FusedFFF

__all__ = ["FusedFFF"]
