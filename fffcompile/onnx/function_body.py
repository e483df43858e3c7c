"""The standard-op body of an fffcompile node: the hardened descent as a model-local ONNX function.

The body computes exactly ``reference.hard`` (FORMS.md) with standard ONNX ops, so that the
file runs in ONNX Runtime, onnx's reference evaluator and TensorRT's parser with no plugin.
Notation: R rows (X flattened to (R, d_in) once), D depth, heap-ordered nodes.

1. Setup, once: X2 = Reshape(X, [-1, d_in]) (d_in read from node_weight's shape), cast to the
   compute dtype (float32 for 16-bit types, as in ``reference.compute_dtype``);
   Xa = [X2, 1] (R, d_in + 1) so that every logit is one
   dot product with a bias-augmented weight row Wa_n = [W_n, b_n]. Weight preparation
   (Concat with the bias, Transpose, Cast) depends on initializers only: runtimes fold it
   into constants when the session is built.
2. Top block, the first K = min(D, 5) decision levels at once: their 2^K - 1 logits by one
   Gemm, Z = Xa Wa[:2^K-1]^T; signs s = +1 where the row goes right ([z >= 0] for tie "ge",
   [z > 0] for "gt") else -1; the block leaf t = argmax_j (s C)_j with C[n, j] = +1 / -1 when
   leaf j's path turns right / left at node n (0 off the path): the reached leaf scores K, every
   other leaf at most K - 2, so the argmax is unique and exact in floating point.
3. The remaining levels one at a time, row index G (R,) int64 (form B: (R, P, 1), tree p's rows
   offset by p n), heap node of level K first: w = Gather(Wa, G); z = ReduceSum(w * Xa, -1);
   G = G + Where(right, 2^(k+1), 2^k). The rows below the top block are stored in descent order
   (``descent_order``: level k's turn at bit k of the row's code, so no multiply by 2; the Gathers
   that reorder Wa, the leaves or V depend on initializers only and are folded); form A's last
   level folds in "- (2^D - 1)" and yields the (reordered) leaf j. Six ops a level, no per-level
   shape arithmetic. (Measured in ONNX Runtime and left
   out as slower or no faster: the dot as a batched MatMul or Einsum, the bias as its own
   Gather + Add, an ArgMax decision per level, a top block of 4, 6 or 7 levels.)
4. Form A leaves: h = act(Xa . Wa1[j]) with Wa1 = [W1; b1] gathered per row (a batched MatMul
   of (R, 1, d_in + 1) by (R, d_in + 1, l)), then y = [h, 1] . Wa2[j] with Wa2 = [W2; b2]
   (linear leaves: y = h).
   Form B: the top block's visited neurons by one masked Gemm, y = (act(Z) * on_path[t]) V[:2^K - 1] + b_out
   (on_path[t] the 0/1 row of block leaf t's path, the bias as the Gemm's C: no gather of those
   output rows); the levels below it: every visited neuron's logit and index, concatenated over levels
   (R, P (D + 1 - K)), y += act(z) . Gather(V, indices) (one Gather of those output rows and one batched
   MatMul, not one per level). Measured in ONNX Runtime, 1 thread, UltraFastBERT 1x11 (CPU time, shared
   machine): 15% less at batch 128, 10% at 4096 than gathering all D + 1 output rows.
   Depth 0 (no decision) is the dense one-leaf / root-neuron layer.
5. Y = Reshape(y, [X.shape[:-1], d_out], allowzero=1), cast back to X's dtype.

Constants are Constant nodes of the body (functions have no initializers); integer constants
are int64. The body is written in the model's ai.onnx opset (``MIN_OPSET`` at least): ONNX
requires a local function's opset imports to agree with the model's. Bodies never embed the
widths, so one body serves every layer of one ``NodeConfig``.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .contract import DOMAIN, LEAF_OP_TYPES, MIN_OPSET, NodeConfig

TOP_BLOCK_LEVELS = 5

_COMPUTE = {TensorProto.FLOAT: TensorProto.FLOAT, TensorProto.DOUBLE: TensorProto.DOUBLE,
            TensorProto.FLOAT16: TensorProto.FLOAT, TensorProto.BFLOAT16: TensorProto.FLOAT}
_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}


class _Body:
    """Appends nodes with generated, unique value names; each op call returns its output name."""

    def __init__(self, config: NodeConfig, opset: int):
        self.nodes: list[onnx.NodeProto] = []
        self.opset = opset
        self.compute = _COMPUTE[config.dtype]
        self.cast = self.compute != config.dtype
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        self._count += 1
        out = f"_{op_type.lower()}{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attributes))
        return out

    def const(self, value, dtype=np.int64) -> str:
        array = np.asarray(value, dtype=dtype)
        self._count += 1
        out = f"_const{self._count}"
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array, out)))
        return out

    def real(self, value) -> str:
        """A constant of the compute dtype."""
        return self.const(value, _NUMPY[self.compute])

    def to_compute(self, name: str) -> str:
        return self.op("Cast", name, to=self.compute) if self.cast else name

    def unsqueeze(self, name: str, *axes: int) -> str:
        return self.op("Unsqueeze", name, self.const(list(axes)))

    def reduce_sum_last(self, name: str) -> str:
        return self.op("ReduceSum", name, self.const([-1]), keepdims=0)

    def append_one(self, name: str, rank: int = 2) -> str:
        """[t, 1] along the last axis of a tensor of rank ``rank``."""
        pads = [0] * (2 * rank)
        pads[-1] = 1
        return self.op("Pad", name, self.const(pads), self.real(1.0))

    def shape(self, name: str, start: int = 0, end=None) -> str:
        if self.opset >= 15:
            kwargs = {"start": start} if start else {}
            if end is not None:
                kwargs["end"] = end
            return self.op("Shape", name, **kwargs)
        full = self.op("Shape", name)
        return self.op("Slice", full, self.const([start]), self.const([end if end is not None else 2 ** 62]), self.const([0]))


def _activation(body: _Body, name: str, activation: str) -> str:
    """The formulas of ``fffcompile.activations``; gelu in its erf form (runs in every opset)."""
    if activation == "identity":
        return name
    if activation == "relu":
        return body.op("Relu", name)
    if activation == "relu2":
        positive = body.op("Relu", name)
        return body.op("Mul", positive, positive)
    if activation == "sigmoid":
        return body.op("Sigmoid", name)
    if activation == "tanh":
        return body.op("Tanh", name)
    if activation == "silu":
        return body.op("Mul", name, body.op("Sigmoid", name))
    if activation == "gelu":
        cdf = body.op("Add", body.op("Erf", body.op("Div", name, body.real(math.sqrt(2.0)))), body.real(1.0))
        return body.op("Mul", body.op("Mul", name, cdf), body.real(0.5))
    if activation == "gelu_tanh":
        cube = body.op("Mul", body.op("Mul", name, name), name)
        inner = body.op("Mul", body.op("Add", name, body.op("Mul", cube, body.real(0.044715))),
                        body.real(math.sqrt(2.0 / math.pi)))
        return body.op("Mul", body.op("Mul", name, body.op("Add", body.op("Tanh", inner), body.real(1.0))),
                       body.real(0.5))
    raise ValueError(f"unknown activation {activation!r}")


def _goes_right(body: _Body, z: str, tie: str) -> str:
    return body.op("GreaterOrEqual" if tie == "ge" else "Greater", z, body.real(0.0))


def block_paths(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """For a complete block of ``levels`` levels: C (2^K - 1, 2^K) with C[n, j] = +1 / -1 where leaf
    j's path turns right / left at node n (0 off the path), and the heap nodes each leaf's path visits (2^K, K)."""
    leaves = 2 ** levels
    turns = np.zeros((leaves - 1, leaves), np.float64)
    visited = np.zeros((leaves, levels), np.int64)
    for leaf in range(leaves):
        node = 0
        for level in range(levels):
            right = (leaf >> (levels - 1 - level)) & 1
            turns[node, leaf] = 1.0 if right else -1.0
            visited[leaf, level] = node
            node = 2 * node + 1 + right
    return turns, visited


def descent_order(depth: int, top: int) -> np.ndarray:
    """Heap rows in descent order: row 2^k - 1 + c holds heap node 2^k - 1 + m, where for levels k > ``top``
    the code c keeps the top block's leaf in its low ``top`` bits and puts the turn taken at level j (j >= top)
    at bit j (m, the heap order, has the turns most significant first). Levels <= ``top`` are unchanged.

    In this order a row's index after level k is G_{k+1} = G_k + 2^k (1 + right_k): one Where and one Add
    per level, no multiply."""
    order = np.arange(2 ** (depth + 1) - 1)
    for k in range(top + 1, depth + 1):
        m = np.arange(2 ** k)
        c = m >> (k - top)
        for j in range(top, k):
            c = c + (((m >> (k - 1 - j)) & 1) << j)
        order[2 ** k - 1 + c] = 2 ** k - 1 + m
    return order


def _top_block(body: _Body, xa: str, wa: str, config: NodeConfig, levels: int, trees_axis: bool):
    """Logits of the first ``levels`` levels (R, [P,] M) and the leaf t of the block (R[, P]) per row/tree."""
    nodes = 2 ** levels - 1
    n = 2 ** (config.depth + 1) - 1
    if trees_axis:
        rows = (np.arange(config.trees)[:, None] * n + np.arange(nodes)[None]).reshape(-1)
        top = body.op("Gather", wa, body.const(rows))
        logits = body.op("Reshape", body.op("Gemm", xa, top, transB=1), body.const([0, config.trees, nodes]))
    else:
        top = body.op("Slice", wa, body.const([0]), body.const([nodes]), body.const([0]))   # axes explicit: TensorRT's parser defaults them to every axis
        logits = body.op("Gemm", xa, top, transB=1)
    turns, _ = block_paths(levels)
    signs = body.op("Where", _goes_right(body, logits, config.tie), body.real(1.0), body.real(-1.0))
    leaf = body.op("ArgMax", body.op("MatMul", signs, body.real(turns)), axis=-1, keepdims=0)
    return logits, leaf


def _augmented_nodes(body: _Body, node_weight: str, node_bias: str, config: NodeConfig) -> str:
    """Wa = [W, b]: (N, d_in + 1) for form A, (P n, d_in + 1) for form B (folded at session build)."""
    if config.op_type in LEAF_OP_TYPES:
        weight, bias = node_weight, body.unsqueeze(node_bias, 1)
    else:
        weight = body.op("Flatten", node_weight, axis=2)
        bias = body.op("Reshape", node_bias, body.const([config.trees * (2 ** (config.depth + 1) - 1), 1]))
    return body.op("Concat", body.to_compute(weight), body.to_compute(bias), axis=1)


def _leaf_mlp_tree(body: _Body, config: NodeConfig, xa: str) -> tuple[str, str]:
    """Form A: (y with R rows and d_out columns in the compute dtype, the input whose last dim is d_out)."""
    depth = config.depth
    w1 = body.op("Concat", body.to_compute("leaf_w1"), body.to_compute(body.unsqueeze("leaf_b1", 1)), axis=1)
    w2 = None
    if not config.linear_leaves:
        w2 = body.op("Concat", body.to_compute("leaf_w2"), body.to_compute(body.unsqueeze("leaf_b2", 1)), axis=1)
    width_source = "leaf_b1" if config.linear_leaves else "leaf_b2"
    if depth == 0:
        h = _activation(body, body.op("MatMul", xa, body.op("Gather", w1, body.const(0))), config.activation)
        if w2 is None:
            return h, width_source
        return body.op("MatMul", body.append_one(h), body.op("Gather", w2, body.const(0))), width_source
    wa = _augmented_nodes(body, "node_weight", "node_bias", config)
    levels = min(depth, TOP_BLOCK_LEVELS)
    _, node = _top_block(body, xa, wa, config, levels, trees_axis=False)
    routing = 2 ** depth - 1
    if levels < depth:                          # rows, leaves in descent order (folded at session build)
        order = descent_order(depth, levels)
        wa = body.op("Gather", wa, body.const(order[:routing]))
        leaves = body.const(order[routing:] - routing)
        w1 = body.op("Gather", w1, leaves)
        w2 = None if w2 is None else body.op("Gather", w2, leaves)
        node = body.op("Add", node, body.const(2 ** levels - 1))
    for level in range(levels, depth):
        z = body.reduce_sum_last(body.op("Mul", body.op("Gather", wa, node), xa))
        last = 0 if level < depth - 1 else routing            # the last level yields the leaf's row
        node = body.op("Add", node, body.op("Where", _goes_right(body, z, config.tie),
                                            body.const(2 ** (level + 1) - last), body.const(2 ** level - last)))
    leaf = node
    h = body.op("MatMul", body.unsqueeze(xa, 1), body.op("Gather", w1, leaf))              # (R, 1, l)
    h = _activation(body, h, config.activation)
    if w2 is None:
        return h, width_source
    y = body.op("MatMul", body.append_one(h, rank=3), body.op("Gather", w2, leaf))             # (R, 1, d_out)
    return y, width_source


def _neuron_tree(body: _Body, config: NodeConfig, xa: str) -> tuple[str, str]:
    """Form B: (y with R rows and d_out columns in the compute dtype, the input whose last dim is d_out)."""
    depth, trees = config.depth, config.trees
    n = 2 ** (depth + 1) - 1
    offsets = np.arange(trees) * n
    wa = _augmented_nodes(body, "node_weight", "node_bias", config)
    out_weight = body.to_compute(body.op("Flatten", "out_weight", axis=2))   # (P n, d_out)
    if depth > TOP_BLOCK_LEVELS:                # rows in descent order, per tree (folded at session build)
        order = (descent_order(depth, TOP_BLOCK_LEVELS)[None] + offsets[:, None]).reshape(-1)
        wa = body.op("Gather", wa, body.const(order))
        out_weight = body.op("Gather", out_weight, body.const(order))
    out_bias = body.to_compute("out_bias")
    if depth == 0:
        a = _activation(body, body.op("Gemm", xa, wa, transB=1), config.activation)     # (R, P)
        return body.op("Gemm", a, out_weight, out_bias), "out_bias"
    levels = min(depth, TOP_BLOCK_LEVELS)
    block = 2 ** levels - 1
    logits, leaf = _top_block(body, xa, wa, config, levels, trees_axis=True)          # (R, P, M), (R, P)
    _, paths = block_paths(levels)                                                    # the block's rows of the output:
    on_path = np.zeros((block + 1, block))                                            # one masked Gemm, bias as C
    on_path[np.arange(block + 1)[:, None], paths] = 1.0
    exits = body.const(np.arange(block + 1)[:, None] + block)                         # heap node of level K per block leaf
    node = body.op("Gather", exits, leaf)                                             # (R, P, 1)
    if trees > 1:                                                                     # tree p's rows start at p n
        node = body.op("Add", node, body.const(offsets[:, None]))
    xa4 = body.unsqueeze(xa, 1, 2)                                                    # (R, 1, 1, d_in + 1)
    zs, nodes = [], []
    for level in range(levels, depth + 1):
        z = body.reduce_sum_last(body.op("Mul", body.op("Gather", wa, node), xa4))     # (R, P, 1)
        zs.append(z)
        nodes.append(node)
        if level < depth:
            node = body.op("Add", node, body.op("Where", _goes_right(body, z, config.tie),
                                                body.const(2 ** (level + 1)), body.const(2 ** level)))
    visits = trees * len(zs)
    a = _activation(body, body.op("Concat", logits, *zs, axis=2), config.activation)   # one activation for all
    a_top = body.op("Slice", a, body.const([0]), body.const([block]), body.const([2]))
    a_top = body.op("Mul", a_top, body.op("Gather", body.real(on_path), leaf))
    a_top = body.op("Reshape", a_top, body.const([-1, trees * block]))                 # (R, P M)
    if trees > 1:
        top_rows = body.op("Gather", out_weight, body.const((offsets[:, None] + np.arange(block)).reshape(-1)))
    else:
        top_rows = body.op("Slice", out_weight, body.const([0]), body.const([block]), body.const([0]))
    y_top = body.op("Gemm", a_top, top_rows, out_bias)                                 # (R, d_out)
    a = body.op("Slice", a, body.const([block]), body.const([block + len(zs)]), body.const([2]))
    a = body.op("Reshape", a, body.const([-1, 1, visits]))                            # (R, 1, P (D + 1 - K))
    index = body.op("Reshape", nodes[0] if len(nodes) == 1 else body.op("Concat", *nodes, axis=2),
                    body.const([-1, visits]))
    y = body.op("MatMul", a, body.op("Gather", out_weight, index))                  # (R, 1, d_out)
    return body.op("Add", body.op("Squeeze", y, body.const([1])), y_top), "out_bias"


def build_function(config: NodeConfig, opset: int) -> onnx.FunctionProto:
    """The FunctionProto (domain, op_type, overload = config.overload) computing ``config``'s hard descent."""
    if opset < MIN_OPSET:
        raise ValueError(f"the fffcompile function body needs ai.onnx opset {MIN_OPSET} or later, got {opset}")
    body = _Body(config, opset)
    rows_shape = body.op("Concat", body.const([-1]), body.shape("node_weight", start=-1), axis=0)   # folded
    x2 = body.to_compute(body.op("Reshape", "X", rows_shape))
    xa = body.append_one(x2)
    if config.op_type in LEAF_OP_TYPES:
        y, width_source = _leaf_mlp_tree(body, config, xa)
    else:
        y, width_source = _neuron_tree(body, config, xa)
    out_shape = body.op("Concat", body.shape("X", end=-1), body.shape(width_source, start=-1), axis=0)
    if body.cast:
        y = body.op("Reshape", y, out_shape, allowzero=1)
        body.nodes.append(helper.make_node("Cast", [y], ["Y"], to=config.dtype))
    else:
        body.nodes.append(helper.make_node("Reshape", [y, out_shape], ["Y"], allowzero=1))
    return helper.make_function(DOMAIN, config.op_type, list(config.input_names), ["Y"], body.nodes,
                                [helper.make_opsetid("", opset)], attributes=["depth", "activation", "tie"],
                                attribute_protos=[helper.make_attribute("plugin_namespace", ""),
                                                  helper.make_attribute("plugin_version", "")],
                                overload=config.overload,
                                doc_string=f"fffcompile {config.op_type} {config.overload}: hardened FFF descent "
                                           f"in standard ops (see fffcompile.onnx.function_body)")
