"""Ahead-of-time PTX for the Triton kernels, for a named GPU target, without a GPU.

``compile_leaf_mlp_tree(dtype, config, arch=90)`` and ``compile_neuron_tree(...)`` run Triton's
compiler (``triton.compile`` on an ``ASTSource``, target ``GPUTarget("cuda", arch, 32)``) and
return the kernel's entry name, its PTX, and what a launcher needs: threads per program
(num_warps * 32), dynamic shared memory, rows per program (grid = ceil(rows / block_rows)).

The kernel parameters are the layer's tensors, then the row count (int32), then the output
(``runtime.triton_kernels``). Triton >= 3.3 appends hidden pointer parameters to every kernel
(global scratch, and since 3.5 profile scratch) that its own launcher fills in. A foreign
launcher such as TensorRT's ahead-of-time plugin passes exactly the declared arguments, so
``compile_*`` removes the hidden parameters from the PTX entry. That is only sound when the
kernel uses no scratch memory (sizes 0 in Triton's metadata) and the PTX body never names
them; both are checked, and the result is refused otherwise.

Triton's interpreter (TRITON_INTERPRET=1) replaces the kernels by interpreted functions that
cannot be compiled: generate PTX in a process without it.

Only PTX is produced here (ptxas is the next stage, and the tests run the ptxas that ships
with Triton on the result). The PTX is specific to ``arch`` (sm_90 PTX is emitted as sm_90a:
it loads on that architecture only); build it for the GPU the engine will run on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from ..errors import InternalError
from .triton_kernels import LeafMLPConfig, NeuronTreeConfig, leaf_mlp_tree_kernel, neuron_tree_kernel

_POINTER_TYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str            # the PTX entry point
    ptx: str             # PTX with exactly the declared parameters
    threads: int         # threads per program (block_x of the launch)
    shared_bytes: int    # dynamic shared memory per program
    block_rows: int      # rows per program: grid_x = ceil(rows / block_rows)
    parameters: int      # parameters of the entry point
    arch: int            # the compute capability it was compiled for, e.g. 90


def compile_leaf_mlp_tree(dtype: torch.dtype, config: LeafMLPConfig, arch: int = 90) -> CompiledKernel:
    """PTX of the form-A kernel for one layer shape; inputs x, nodes, leaf_w1, leaf_b1 (and leaf_w2, leaf_b2)."""
    pointer = _pointer_type(dtype)
    linear = {} if config.has_w2 else {"leaf_w2_ptr": None, "leaf_b2_ptr": None}
    tensors = ["x_ptr", "node_weight_ptr", "node_bias_ptr", "leaf_w1_ptr", "leaf_b1_ptr", "leaf_w2_ptr", "leaf_b2_ptr"]
    return _compile(leaf_mlp_tree_kernel, tensors, pointer, {**config.constexprs(), **linear}, arch)


def compile_neuron_tree(dtype: torch.dtype, config: NeuronTreeConfig, arch: int = 90) -> CompiledKernel:
    """PTX of the form-B kernel for one layer shape; inputs x, node_weight, node_bias, out_weight, out_bias."""
    pointer = _pointer_type(dtype)
    tensors = ["x_ptr", "node_weight_ptr", "node_bias_ptr", "out_weight_ptr", "out_bias_ptr"]
    return _compile(neuron_tree_kernel, tensors, pointer, config.constexprs(), arch)


def _pointer_type(dtype: torch.dtype) -> str:
    if dtype not in _POINTER_TYPE:
        raise InternalError(f"no Triton kernel for dtype {dtype}; the plugin declares only {list(_POINTER_TYPE)}")
    return _POINTER_TYPE[dtype]


def _compile(kernel, tensors: list[str], pointer: str, constexprs: dict, arch: int) -> CompiledKernel:
    if not isinstance(kernel, JITFunction):
        raise InternalError("PTX cannot be generated in a process where TRITON_INTERPRET=1 was set before triton "
                            "was imported (the kernels are interpreted functions there); unset it")
    signature = {name: ("constexpr" if name in constexprs else pointer) for name in tensors}
    signature.update({"rows": "i32", "y_ptr": pointer})
    signature.update({name: "constexpr" for name in constexprs if name not in signature})
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    declared = sum(1 for kind in signature.values() if kind != "constexpr")
    ptx = strip_hidden_parameters(compiled.asm["ptx"], compiled.metadata.name, declared,
                                  compiled.metadata.global_scratch_size, compiled.metadata.profile_scratch_size)
    return CompiledKernel(compiled.metadata.name, ptx, compiled.metadata.num_warps * 32, compiled.metadata.shared,
                          constexprs["BLOCK_ROWS"], declared, arch)


def entry_parameters(ptx: str, name: str) -> list[str]:
    """The parameter names of PTX entry ``name``, in order."""
    return re.findall(r"\.param\s+[^,)]*?\b(" + re.escape(name) + r"_param_\d+)", _entry_signature(ptx, name).group(2))


def strip_hidden_parameters(ptx: str, name: str, declared: int, global_scratch: int, profile_scratch: int) -> str:
    """``ptx`` with the entry's parameters after the first ``declared`` removed (see the module docstring)."""
    parameters = entry_parameters(ptx, name)
    hidden = parameters[declared:]
    if not hidden:
        return ptx
    if global_scratch or profile_scratch:
        raise InternalError(f"kernel {name} uses scratch memory ({global_scratch} + {profile_scratch} bytes); "
                            "it cannot be launched with its declared arguments alone")
    used = [p for p in hidden if len(re.findall(re.escape(p) + r"\b", ptx)) > 1]
    if used:
        raise InternalError(f"kernel {name} reads its hidden parameters {used}")
    match = _entry_signature(ptx, name)
    declarations = [d for d in match.group(2).split(",") if not any(re.search(re.escape(p) + r"\b", d) for p in hidden)]
    return ptx[:match.start(2)] + ",".join(declarations) + "\n" + ptx[match.end(2):]


def _entry_signature(ptx: str, name: str) -> re.Match:
    match = re.search(r"(\.entry\s+" + re.escape(name) + r"\s*\()([^)]*)(\))", ptx)
    if match is None:
        raise InternalError(f"PTX has no entry {name}")
    return match
