"""TensorRT plugins for the fffcompile ONNX nodes, as Quickly Deployable Plugins (``tensorrt.plugin``).

Importing this module (and nothing else in fffcompile) imports tensorrt and triton and
registers three plugins in TensorRT's plugin registry, namespace "fffcompile", version "1":

    LeafMLPTree     X (..., d_in), node_weight (N, d_in), node_bias (N,), leaf_w1 (L, d_in, l),
                    leaf_b1 (L, l), leaf_w2 (L, l, d_out), leaf_b2 (L, d_out)  ->  Y (..., d_out)
    LeafLinearTree  the same without leaf_w2, leaf_b2 (linear leaves)         ->  Y (..., l)
    NeuronTree      X, node_weight (P, n, d_in), node_bias (P, n), out_weight (P, n, d_out),
                    out_bias (d_out,)                                           ->  Y (..., d_out)

with attributes depth (int), activation (str), tie (str). TensorRT's ONNX parser binds a node
to a plugin when the node's op_type is the plugin name and its ``plugin_namespace`` attribute is
"fffcompile" (``plugin_version`` defaults to "1"); node attributes that are not plugin fields
are ignored. A registered plugin takes precedence over the model-local function of the same
name; without this module imported, the parser inlines that function (standard layers).

A QDP's inputs are fixed, so linear leaves need their own op_type: a 5-input "LeafMLPTree"
node would bind to the 7-input plugin and fail. The exporter writes "LeafLinearTree" for them.

Each plugin defines:
- ``register``: the output's shape (X's leading dims, then d_out) and dtype (X's);
- ``autotune``: all inputs and the output share one dtype, float32, float16 or bfloat16, linear
  layout (``runtime.triton_kernels`` accumulates the 16-bit types in float32);
- ``aot_impl``: the Triton kernel compiled to PTX for the GPU that builds the engine
  (``runtime.triton_ptx``), launched by TensorRT with grid ceil(rows / block_rows), 32 x num_warps
  threads and one extra int32 argument, the row count. The engine then carries the kernel and
  runs without Python (``trtexec --loadEngine``);
- ``impl``: the runtime (JIT) fallback: the op's CUDA implementation (``runtime.cuda_dispatch``:
  the same Triton kernel, or the reference where the kernel refuses) on TensorRT's stream,
  copied into TensorRT's output (needs Python, torch with CUDA and triton at run time).

With both defined, TensorRT needs a preference: a node attribute ``aot`` (1: ahead of time,
0: JIT) or the network flag PREFER_AOT_PYTHON_PLUGINS, which ``runtime.trt_engine`` sets.
Kernels compiled by Triton 3.7 emit PTX ISA 8.7: the GPU driver must be able to JIT it (CUDA
12.8 or newer driver).

Not verified on this project's machines (no GPU, and TensorRT's wheels do not install without
one): everything here past the PTX generation, which ``tests/test_triton_ptx.py`` covers.
"""
# No ``from __future__ import annotations``: tensorrt.plugin reads the annotations as classes.
import functools
import operator
from typing import List, Tuple, Union

from ..errors import MissingDependencyError

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except ImportError as error:
    raise MissingDependencyError(
        f"TensorRT's Python package with tensorrt.plugin is not importable ({error}); on a machine with an NVIDIA "
        "GPU: pip install 'tensorrt>=10.8' (see docs/tensorrt.md)") from error
if not hasattr(trtp, "aot_impl"):
    raise MissingDependencyError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl (ahead-of-time Python "
                                 "plugins); pip install 'tensorrt>=10.8'")
try:
    import torch
    import triton  # noqa: F401
except ImportError as error:
    raise MissingDependencyError(f"the fffcompile TensorRT plugins compile Triton kernels: {error}; "
                                 "pip install 'fffcompile[gpu]'") from error

from . import cuda_dispatch, triton_kernels, triton_ptx

NAMESPACE = "fffcompile"
_TORCH_DTYPE = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
_IO_TYPES = "FP32|FP16|BF16"
_AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]


# ----------------------------------------------------------------------------- shared pieces

def _output_desc(X: trtp.TensorDesc, d_out: trtp.ShapeExpr) -> trtp.TensorDesc:
    return trtp.from_shape_expr(tuple(X.shape_expr)[:-1] + (d_out,), dtype=X.dtype)


def _constant(desc: trtp.TensorDesc, axis: int) -> int:
    return int(desc.shape_expr[axis].constant_value())


def _rows(X: trtp.TensorDesc) -> trtp.ShapeExpr:
    return functools.reduce(operator.mul, tuple(X.shape_expr)[:-1], trtp.ShapeExpr(1))


def _build_arch() -> int:
    """Compute capability of the GPU building the engine (e.g. 90), as Triton sees it."""
    return int(triton.runtime.driver.active.get_current_target().arch)


def _autotune(count: int) -> List[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(", ".join([_IO_TYPES] * count), "LINEAR")]


def _accepted(form: str, dtype: torch.dtype, register_row: int, activation: str, tie: str) -> torch.dtype:
    """``dtype`` where the Triton kernel accepts the node; otherwise the build fails with the reason."""
    reason = triton_kernels.refusal(form, dtype, register_row, activation, tie)
    if reason is not None:
        raise ValueError(f"the fffcompile {form} plugin cannot run this node: {reason}; export it without the "
                         "plugin (TensorRT then inlines the node's local function)")
    return dtype


def _launch(kernel: triton_ptx.CompiledKernel, X: trtp.TensorDesc) -> _AotResult:
    rows = _rows(X)
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(rows, kernel.block_rows)
    params.block_x = kernel.threads
    params.shared_mem = kernel.shared_bytes
    return kernel.name.encode(), kernel.ptx.encode(), params, trtp.SymIntExprs.from_tuple([trtp.SymInt32(rows)])


def _cuda(*tensors):
    return [torch.as_tensor(t, device="cuda") for t in tensors]


# ----------------------------------------------------------------------------- LeafMLPTree

@trtp.register(f"{NAMESPACE}::LeafMLPTree")
def leaf_mlp_tree_desc(X: trtp.TensorDesc, node_weight: trtp.TensorDesc, node_bias: trtp.TensorDesc,
                       leaf_w1: trtp.TensorDesc, leaf_b1: trtp.TensorDesc, leaf_w2: trtp.TensorDesc,
                       leaf_b2: trtp.TensorDesc, depth: int, activation: str, tie: str) -> trtp.TensorDesc:
    return _output_desc(X, leaf_w2.shape_expr[2])


@trtp.autotune(f"{NAMESPACE}::LeafMLPTree")
def leaf_mlp_tree_autotune(X, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2,
                           outputs) -> List[trtp.AutoTuneCombination]:
    return _autotune(8)


@trtp.aot_impl(f"{NAMESPACE}::LeafMLPTree")
def leaf_mlp_tree_aot(X: trtp.TensorDesc, node_weight: trtp.TensorDesc, node_bias: trtp.TensorDesc,
                      leaf_w1: trtp.TensorDesc, leaf_b1: trtp.TensorDesc, leaf_w2: trtp.TensorDesc,
                      leaf_b2: trtp.TensorDesc, depth: int, activation: str, tie: str,
                      outputs: Tuple[trtp.TensorDesc], tactic: int) -> _AotResult:
    config = triton_kernels.LeafMLPConfig(_constant(leaf_w1, 1), _constant(leaf_w1, 2), _constant(leaf_w2, 2), depth,
                                          activation, tie, True)
    dtype = _accepted("leaf_mlp", _TORCH_DTYPE[X.dtype], config.width, activation, tie)
    return _launch(triton_ptx.compile_leaf_mlp_tree(dtype, config, _build_arch()), X)


@trtp.impl(f"{NAMESPACE}::LeafMLPTree")
def leaf_mlp_tree_impl(X: trtp.Tensor, node_weight: trtp.Tensor, node_bias: trtp.Tensor, leaf_w1: trtp.Tensor,
                       leaf_b1: trtp.Tensor, leaf_w2: trtp.Tensor, leaf_b2: trtp.Tensor, activation: str, tie: str,
                       outputs: Tuple[trtp.Tensor], stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        x, *weights, y = _cuda(X, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, outputs[0])
        y.copy_(cuda_dispatch.leaf_mlp_tree_cuda(x, *weights, activation, tie).reshape(y.shape))


# ----------------------------------------------------------------------------- LeafLinearTree

@trtp.register(f"{NAMESPACE}::LeafLinearTree")
def leaf_linear_tree_desc(X: trtp.TensorDesc, node_weight: trtp.TensorDesc, node_bias: trtp.TensorDesc,
                          leaf_w1: trtp.TensorDesc, leaf_b1: trtp.TensorDesc, depth: int, activation: str,
                          tie: str) -> trtp.TensorDesc:
    return _output_desc(X, leaf_w1.shape_expr[2])


@trtp.autotune(f"{NAMESPACE}::LeafLinearTree")
def leaf_linear_tree_autotune(X, node_weight, node_bias, leaf_w1, leaf_b1, outputs) -> List[trtp.AutoTuneCombination]:
    return _autotune(6)


@trtp.aot_impl(f"{NAMESPACE}::LeafLinearTree")
def leaf_linear_tree_aot(X: trtp.TensorDesc, node_weight: trtp.TensorDesc, node_bias: trtp.TensorDesc,
                         leaf_w1: trtp.TensorDesc, leaf_b1: trtp.TensorDesc, depth: int, activation: str, tie: str,
                         outputs: Tuple[trtp.TensorDesc], tactic: int) -> _AotResult:
    width = _constant(leaf_w1, 2)
    config = triton_kernels.LeafMLPConfig(_constant(leaf_w1, 1), width, width, depth, activation, tie, False)
    dtype = _accepted("leaf_mlp", _TORCH_DTYPE[X.dtype], width, activation, tie)
    return _launch(triton_ptx.compile_leaf_mlp_tree(dtype, config, _build_arch()), X)


@trtp.impl(f"{NAMESPACE}::LeafLinearTree")
def leaf_linear_tree_impl(X: trtp.Tensor, node_weight: trtp.Tensor, node_bias: trtp.Tensor, leaf_w1: trtp.Tensor,
                          leaf_b1: trtp.Tensor, activation: str, tie: str, outputs: Tuple[trtp.Tensor],
                          stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        x, *weights, y = _cuda(X, node_weight, node_bias, leaf_w1, leaf_b1, outputs[0])
        y.copy_(cuda_dispatch.leaf_mlp_tree_cuda(x, *weights, None, None, activation, tie).reshape(y.shape))


# ----------------------------------------------------------------------------- NeuronTree

@trtp.register(f"{NAMESPACE}::NeuronTree")
def neuron_tree_desc(X: trtp.TensorDesc, node_weight: trtp.TensorDesc, node_bias: trtp.TensorDesc,
                     out_weight: trtp.TensorDesc, out_bias: trtp.TensorDesc, depth: int, activation: str,
                     tie: str) -> trtp.TensorDesc:
    return _output_desc(X, out_weight.shape_expr[2])


@trtp.autotune(f"{NAMESPACE}::NeuronTree")
def neuron_tree_autotune(X, node_weight, node_bias, out_weight, out_bias, outputs) -> List[trtp.AutoTuneCombination]:
    return _autotune(6)


@trtp.aot_impl(f"{NAMESPACE}::NeuronTree")
def neuron_tree_aot(X: trtp.TensorDesc, node_weight: trtp.TensorDesc, node_bias: trtp.TensorDesc,
                    out_weight: trtp.TensorDesc, out_bias: trtp.TensorDesc, depth: int, activation: str, tie: str,
                    outputs: Tuple[trtp.TensorDesc], tactic: int) -> _AotResult:
    config = triton_kernels.NeuronTreeConfig(_constant(node_weight, 2), _constant(out_weight, 2),
                                             _constant(node_weight, 0), depth, activation, tie)
    dtype = _accepted("neuron_tree", _TORCH_DTYPE[X.dtype], config.trees * (depth + 1), activation, tie)
    return _launch(triton_ptx.compile_neuron_tree(dtype, config, _build_arch()), X)


@trtp.impl(f"{NAMESPACE}::NeuronTree")
def neuron_tree_impl(X: trtp.Tensor, node_weight: trtp.Tensor, node_bias: trtp.Tensor, out_weight: trtp.Tensor,
                     out_bias: trtp.Tensor, activation: str, tie: str, outputs: Tuple[trtp.Tensor],
                     stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        x, *weights, y = _cuda(X, node_weight, node_bias, out_weight, out_bias, outputs[0])
        y.copy_(cuda_dispatch.neuron_tree_cuda(x, *weights, activation, tie).reshape(y.shape))


PLUGINS = ("LeafMLPTree", "LeafLinearTree", "NeuronTree")
