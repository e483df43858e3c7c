"""The CUDA implementation of ``torch.ops.fffcompile.leaf_mlp_tree`` and ``neuron_tree``.

Registered with ``torch.library.register_kernel(op, "cuda")`` on the existing custom ops, so
that the ops' fake function, autograd formula and pure-torch default stay as they are and only
CUDA tensors are routed here. (``torch.library.triton_op`` would define a new op whose body
torch.compile traces into; these ops are deliberately opaque to the compiler, one fused
kernel each, so registering a device kernel on the existing op is the mechanism that fits.)

For each call: the Triton kernel (``runtime.triton_kernels``) when triton is installed and the
kernel accepts the op (``triton_refusal`` is None: dtype float32, float16 or bfloat16 for x
and every weight; a leaf hidden width, or P (D + 1) path neurons, that fits a program's
registers); otherwise the reference implementation, the ops' own default.

Registering imports nothing from triton: ``runtime.triton_kernels`` is imported on the first
call with CUDA tensors.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..ops import spec_from_leaf_mlp_args, spec_from_neuron_tree_args
from ..spec import FFFSpec


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_refusal(spec: FFFSpec) -> Optional[str]:
    """Why the Triton kernel would not run ``spec``'s tree on CUDA (None when it would)."""
    if not triton_available():
        return "triton is not installed (pip install 'fffcompile[gpu]')"
    from . import triton_kernels
    dtypes = {t.dtype for t in spec.without_master().tensors().values()}
    if len(dtypes) != 1:
        return f"the weights mix dtypes {sorted(map(str, dtypes))}"
    register_row = spec.leaf_width if spec.form == "leaf_mlp" else spec.trees * (spec.depth + 1)
    return triton_kernels.refusal(spec.form, spec.dtype, register_row, spec.activation, spec.tie)


@torch.library.register_kernel("fffcompile::leaf_mlp_tree", "cuda")
def leaf_mlp_tree_cuda(x: Tensor, node_weight: Tensor, node_bias: Tensor, leaf_w1: Tensor, leaf_b1: Tensor,
                       leaf_w2: Optional[Tensor], leaf_b2: Optional[Tensor], activation: str, tie: str) -> Tensor:
    spec = spec_from_leaf_mlp_args(node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, activation, tie)
    if x.dtype == spec.dtype and triton_refusal(spec) is None:
        from . import triton_kernels
        return triton_kernels.leaf_mlp_tree(x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, activation, tie)
    return reference.hard(spec, x)


@torch.library.register_kernel("fffcompile::neuron_tree", "cuda")
def neuron_tree_cuda(x: Tensor, node_weight: Tensor, node_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
                     activation: str, tie: str) -> Tensor:
    spec = spec_from_neuron_tree_args(node_weight, node_bias, out_weight, out_bias, activation, tie)
    if x.dtype == spec.dtype and triton_refusal(spec) is None:
        from . import triton_kernels
        return triton_kernels.neuron_tree(x, node_weight, node_bias, out_weight, out_bias, activation, tie)
    return reference.hard(spec, x)
