"""Triton kernels for the fused descent ops: one program per block of rows, descent and leaf fused.

Form A, ``leaf_mlp_tree`` (FORMS.md A; x (R, d_in) after flattening the leading dims):

    per row: n = 0; D times: z = node_weight[n] . x + node_bias[n]; n = 2n + 1 + [z >= 0] (tie "ge")
             or [z > 0] (tie "gt"); j = n - (2^D - 1)
             h = act(x @ leaf_w1[j] + leaf_b1[j])                   (the whole hidden row in registers)
             y = h @ leaf_w2[j] + leaf_b2[j]   (or y = h with linear leaves, leaf_w2 absent)

Form B, ``neuron_tree`` (FORMS.md B; P trees of n = 2^(D+1) - 1 neurons):

    per row and tree p: n_0 = 0; D + 1 times: a = node_weight[p, n] . x + node_bias[p, n];
             keep act(a) and the flat neuron index p n + n; n = 2n + 1 + [a >= 0] or [a > 0]
    y = out_bias + sum over the P (D + 1) kept neurons of act(a) * out_weight[p, n]

A program holds BLOCK_ROWS rows. Every row gathers its own weight rows (its node, its leaf),
so the products are broadcast-multiply-and-sum tiles, not tensor-core matmuls; the gathered
weights are what the layer costs (DESIGN.md: D d_in + l (d_in + d_out) MACs per row).

Arithmetic follows ``fffcompile.reference``: float32 computes in float32; bfloat16 and float16
are loaded, upcast to float32, accumulated in float32, and the output is rounded once on store
(round to nearest even). Dot products are summed in a different order than torch's, so a row
whose path meets |z| within rounding of zero may take the other branch: compare with
``reference.near_ties`` excluded.

What the kernels refuse (``refusal``, the capability check): a leaf hidden width (form A) or
a path length P (D + 1) (form B) above ``MAX_REGISTER_ROW``, since that row lives in
registers; dtypes other than float32, float16, bfloat16 (float64 is left to the reference).
The CUDA dispatch (``runtime.cuda_dispatch``) then runs the reference instead.

The shapes and the attributes are compile-time constants (one compiled kernel per layer
shape); only the row count is a runtime argument. The argument order is inputs, row count,
output: the order in which TensorRT's ahead-of-time plugin path passes them
(``runtime.trt``), so the same kernel serves torch and TensorRT. Block sizes come from a
register-tile budget (``_TILE_ELEMENTS``; ptxas reports no spills for 768-wide layers at sm_90)
and have not been tuned on a GPU.

Importing this module imports triton; fffcompile imports it only on first use of a CUDA
tensor, or in tests (with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's
interpreter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..spec import ACTIVATIONS, TIES

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The widest row a program keeps in registers: form A's hidden layer, form B's path neurons.
MAX_REGISTER_ROW = 1024
# Elements of the largest 3-D broadcast tile (rows x reduction x columns) a program forms.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_ROWS = 16


# ----------------------------------------------------------------------------- device code

@triton.jit
def _activation(h, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        h = tl.maximum(h, 0.0)
    elif ACTIVATION == "gelu":
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        h = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    elif ACTIVATION == "silu":
        h = h / (1.0 + tl.exp(-h))
    elif ACTIVATION == "sigmoid":
        h = 1.0 / (1.0 + tl.exp(-h))
    elif ACTIVATION == "tanh":
        h = _tanh(h)
    elif ACTIVATION == "relu2":
        h = tl.maximum(h, 0.0)
        h = h * h
    return h


@triton.jit
def _tanh(h):
    # tanh from exp alone (libdevice is not available to Triton's interpreter): with
    # t = exp(-2|h|) in (0, 1], tanh(h) = sign(h) (1 - t) / (1 + t); never overflows.
    t = tl.exp(-2.0 * tl.abs(h))
    magnitude = (1.0 - t) / (1.0 + t)
    return tl.where(h < 0, -magnitude, magnitude)


@triton.jit
def _go_right(z, TIE_GE: tl.constexpr):
    if TIE_GE:
        right = z >= 0
    else:
        right = z > 0
    return right.to(tl.int64)


@triton.jit
def _row_dot(x_ptr, w_ptr, rows64, row_mask, w_row, D_IN: tl.constexpr, BLOCK_IN: tl.constexpr,
             BLOCK_ROWS: tl.constexpr):
    """z[r] = x[rows[r]] . w[w_row[r]] over d_in, accumulated in float32."""
    z = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, D_IN, BLOCK_IN):
        k = start + tl.arange(0, BLOCK_IN)
        mask = row_mask[:, None] & (k < D_IN)[None, :]
        xv = tl.load(x_ptr + rows64[:, None] * D_IN + k[None, :], mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + w_row[:, None] * D_IN + k[None, :], mask=mask, other=0.0).to(tl.float32)
        z += tl.sum(xv * wv, axis=1)
    return z


@triton.jit
def leaf_mlp_tree_kernel(x_ptr, node_weight_ptr, node_bias_ptr, leaf_w1_ptr, leaf_b1_ptr, leaf_w2_ptr, leaf_b2_ptr,
                         rows, y_ptr,
                         D_IN: tl.constexpr, WIDTH: tl.constexpr, D_OUT: tl.constexpr, DEPTH: tl.constexpr,
                         ACTIVATION: tl.constexpr, TIE_GE: tl.constexpr, HAS_W2: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_IN_NODE: tl.constexpr,
                         BLOCK_IN: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK_OUT: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = r < rows
    rows64 = r.to(tl.int64)

    node = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
    for _level in range(DEPTH):
        z = _row_dot(x_ptr, node_weight_ptr, rows64, row_mask, node, D_IN, BLOCK_IN_NODE, BLOCK_ROWS)
        z += tl.load(node_bias_ptr + node, mask=row_mask, other=0.0).to(tl.float32)
        node = 2 * node + 1 + _go_right(z, TIE_GE)
    leaf = node - ((1 << DEPTH) - 1)

    c = tl.arange(0, BLOCK_WIDTH)
    c_mask = c < WIDTH
    h = tl.zeros([BLOCK_ROWS, BLOCK_WIDTH], dtype=tl.float32)
    for start in range(0, D_IN, BLOCK_IN):
        k = start + tl.arange(0, BLOCK_IN)
        k_mask = k < D_IN
        xv = tl.load(x_ptr + rows64[:, None] * D_IN + k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0).to(tl.float32)
        w1 = tl.load(leaf_w1_ptr + leaf[:, None, None] * (D_IN * WIDTH) + k[None, :, None] * WIDTH + c[None, None, :],
                     mask=row_mask[:, None, None] & k_mask[None, :, None] & c_mask[None, None, :], other=0.0).to(tl.float32)
        h += tl.sum(xv[:, :, None] * w1, axis=1)
    h += tl.load(leaf_b1_ptr + leaf[:, None] * WIDTH + c[None, :], mask=row_mask[:, None] & c_mask[None, :],
                 other=0.0).to(tl.float32)
    h = _activation(h, ACTIVATION)

    if HAS_W2:
        for start in range(0, D_OUT, BLOCK_OUT):
            o = start + tl.arange(0, BLOCK_OUT)
            o_mask = o < D_OUT
            w2 = tl.load(leaf_w2_ptr + leaf[:, None, None] * (WIDTH * D_OUT) + c[None, :, None] * D_OUT + o[None, None, :],
                         mask=row_mask[:, None, None] & c_mask[None, :, None] & o_mask[None, None, :],
                         other=0.0).to(tl.float32)
            y = tl.sum(h[:, :, None] * w2, axis=1)
            y += tl.load(leaf_b2_ptr + leaf[:, None] * D_OUT + o[None, :], mask=row_mask[:, None] & o_mask[None, :],
                         other=0.0).to(tl.float32)
            tl.store(y_ptr + rows64[:, None] * D_OUT + o[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & o_mask[None, :])
    else:  # linear leaves: the hidden row is the output (WIDTH == D_OUT)
        tl.store(y_ptr + rows64[:, None] * D_OUT + c[None, :], h.to(y_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & c_mask[None, :])


@triton.jit
def neuron_tree_kernel(x_ptr, node_weight_ptr, node_bias_ptr, out_weight_ptr, out_bias_ptr,
                       rows, y_ptr,
                       D_IN: tl.constexpr, D_OUT: tl.constexpr, TREES: tl.constexpr, DEPTH: tl.constexpr,
                       ACTIVATION: tl.constexpr, TIE_GE: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_PATH: tl.constexpr,
                       BLOCK_OUT: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = r < rows
    rows64 = r.to(tl.int64)
    NODES: tl.constexpr = (2 << DEPTH) - 1
    LEVELS: tl.constexpr = DEPTH + 1

    # The P (D + 1) neurons each row visits: their activations and flat indices p * n + node.
    path = tl.arange(0, BLOCK_PATH)
    acts = tl.zeros([BLOCK_ROWS, BLOCK_PATH], dtype=tl.float32)
    neurons = tl.zeros([BLOCK_ROWS, BLOCK_PATH], dtype=tl.int64)
    for tree in range(TREES):
        node = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
        for level in range(LEVELS):
            flat = tree * NODES + node
            a = _row_dot(x_ptr, node_weight_ptr, rows64, row_mask, flat, D_IN, BLOCK_IN, BLOCK_ROWS)
            a += tl.load(node_bias_ptr + flat, mask=row_mask, other=0.0).to(tl.float32)
            slot = path[None, :] == tree * LEVELS + level
            acts = tl.where(slot, _activation(a, ACTIVATION)[:, None], acts)
            neurons = tl.where(slot, flat[:, None], neurons)
            node = 2 * node + 1 + _go_right(a, TIE_GE)

    path_mask = path < TREES * LEVELS
    for start in range(0, D_OUT, BLOCK_OUT):
        o = start + tl.arange(0, BLOCK_OUT)
        o_mask = o < D_OUT
        v = tl.load(out_weight_ptr + neurons[:, :, None] * D_OUT + o[None, None, :],
                    mask=row_mask[:, None, None] & path_mask[None, :, None] & o_mask[None, None, :],
                    other=0.0).to(tl.float32)
        y = tl.sum(acts[:, :, None] * v, axis=1)
        y += tl.load(out_bias_ptr + o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows64[:, None] * D_OUT + o[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & o_mask[None, :])


# ----------------------------------------------------------------------------- launch configuration

def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class LeafMLPConfig:
    """Compile-time constants of ``leaf_mlp_tree_kernel`` for one layer shape and attribute set."""

    d_in: int
    width: int
    d_out: int
    depth: int
    activation: str
    tie: str
    has_w2: bool

    def constexprs(self) -> dict:
        block_width = _pow2(self.width)
        block_rows = max(1, min(_MAX_BLOCK_ROWS, 1024 // block_width))
        per_column = _TILE_ELEMENTS // (block_rows * block_width)
        return dict(D_IN=self.d_in, WIDTH=self.width, D_OUT=self.d_out, DEPTH=self.depth,
                    ACTIVATION=self.activation, TIE_GE=self.tie == "ge", HAS_W2=self.has_w2,
                    BLOCK_ROWS=block_rows, BLOCK_IN_NODE=max(1, min(_pow2(self.d_in), _TILE_ELEMENTS // block_rows)),
                    BLOCK_IN=max(1, min(_pow2(self.d_in), per_column)),
                    BLOCK_WIDTH=block_width, BLOCK_OUT=max(1, min(_pow2(self.d_out), per_column)))


@dataclass(frozen=True)
class NeuronTreeConfig:
    """Compile-time constants of ``neuron_tree_kernel`` for one layer shape and attribute set."""

    d_in: int
    d_out: int
    trees: int
    depth: int
    activation: str
    tie: str

    def constexprs(self) -> dict:
        block_path = _pow2(self.trees * (self.depth + 1))
        block_rows = max(1, min(_MAX_BLOCK_ROWS, 1024 // block_path))
        return dict(D_IN=self.d_in, D_OUT=self.d_out, TREES=self.trees, DEPTH=self.depth,
                    ACTIVATION=self.activation, TIE_GE=self.tie == "ge",
                    BLOCK_ROWS=block_rows, BLOCK_IN=max(1, min(_pow2(self.d_in), _TILE_ELEMENTS // block_rows)),
                    BLOCK_PATH=block_path,
                    BLOCK_OUT=max(1, min(_pow2(self.d_out), _TILE_ELEMENTS // (block_rows * block_path))))


def leaf_mlp_config(leaf_w1: torch.Tensor, leaf_w2: Optional[torch.Tensor], depth: int,
                    activation: str, tie: str) -> LeafMLPConfig:
    d_in, width = leaf_w1.shape[1], leaf_w1.shape[2]
    d_out = leaf_w2.shape[2] if leaf_w2 is not None else width
    return LeafMLPConfig(d_in, width, d_out, depth, activation, tie, leaf_w2 is not None)


def neuron_tree_config(node_weight: torch.Tensor, out_weight: torch.Tensor, activation: str,
                       tie: str) -> NeuronTreeConfig:
    trees, nodes, d_in = node_weight.shape
    return NeuronTreeConfig(d_in, out_weight.shape[2], trees, (nodes + 1).bit_length() - 2, activation, tie)


# ----------------------------------------------------------------------------- capability check

def refusal(form: str, dtype: torch.dtype, register_row: int, activation: str, tie: str) -> Optional[str]:
    """Why the Triton kernel cannot run this op (None when it can).

    ``register_row``: the leaf hidden width (form A) or the path length P (D + 1) (form B).
    """
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not one of {', '.join(map(str, SUPPORTED_DTYPES))}"
    if activation not in ACTIVATIONS:
        return f"unknown activation {activation!r}"
    if tie not in TIES:
        return f"unknown tie rule {tie!r}"
    if register_row > MAX_REGISTER_ROW:
        what = "leaf hidden width" if form == "leaf_mlp" else "path length P (D + 1)"
        return f"{what} {register_row} exceeds {MAX_REGISTER_ROW}, the widest row a program keeps in registers"
    return None


# ----------------------------------------------------------------------------- torch launchers

def _grid(rows: int, block_rows: int) -> tuple[int]:
    return (triton.cdiv(rows, block_rows),)


def leaf_mlp_tree(x: torch.Tensor, node_weight: torch.Tensor, node_bias: torch.Tensor, leaf_w1: torch.Tensor,
                  leaf_b1: torch.Tensor, leaf_w2: Optional[torch.Tensor], leaf_b2: Optional[torch.Tensor],
                  activation: str, tie: str) -> torch.Tensor:
    """The form-A op on x (..., d_in) with the Triton kernel; the caller has checked ``refusal``."""
    depth = (node_weight.shape[0] + 1).bit_length() - 1
    config = leaf_mlp_config(leaf_w1, leaf_w2, depth, activation, tie)
    X = x.reshape(-1, config.d_in).contiguous()
    y = torch.empty(X.shape[0], config.d_out, dtype=x.dtype, device=x.device)
    if X.shape[0]:
        meta = config.constexprs()
        leaf_mlp_tree_kernel[_grid(X.shape[0], meta["BLOCK_ROWS"])](
            X, node_weight.contiguous(), node_bias.contiguous(), leaf_w1.contiguous(), leaf_b1.contiguous(),
            leaf_w2.contiguous() if leaf_w2 is not None else None,
            leaf_b2.contiguous() if leaf_b2 is not None else None,
            X.shape[0], y, **meta)
    return y.reshape(*x.shape[:-1], config.d_out)


def neuron_tree(x: torch.Tensor, node_weight: torch.Tensor, node_bias: torch.Tensor, out_weight: torch.Tensor,
                out_bias: torch.Tensor, activation: str, tie: str) -> torch.Tensor:
    """The form-B op on x (..., d_in) with the Triton kernel; the caller has checked ``refusal``."""
    config = neuron_tree_config(node_weight, out_weight, activation, tie)
    X = x.reshape(-1, config.d_in).contiguous()
    y = torch.empty(X.shape[0], config.d_out, dtype=x.dtype, device=x.device)
    if X.shape[0]:
        meta = config.constexprs()
        neuron_tree_kernel[_grid(X.shape[0], meta["BLOCK_ROWS"])](
            X, node_weight.contiguous(), node_bias.contiguous(), out_weight.contiguous(), out_bias.contiguous(),
            X.shape[0], y, **meta)
    return y.reshape(*x.shape[:-1], config.d_out)
