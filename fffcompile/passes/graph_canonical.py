"""Canonical view of a captured graph: op names, op classes and per-node facts, computed once.

Graphs from torch.export (ATen overloads), torch.fx (torch functions, methods, modules) and
their noise (view/reshape/transpose/clone/contiguous/expand/detach, dtype casts) are read
through one vocabulary: ``op_name(node)`` is the bare op name ("view", "sigmoid", "linear").

Per-node facts, each memoised in one topological pass (linear in the graph size):

- ``depends``: the node's value depends on some graph input. Shape-only ops (``ones_like``,
  ``sym_size``, ``arange``, ``empty``...) do not carry value dependence: their result is the
  same for every input of the same shape.
- ``affine_source``: for a node whose value is an affine function of one other node x
  (through matmul/linear/einsum with constant weights, adds of constants, slices, gathers with
  constant indices, views and casts), that x; for any other node, the node itself. A decision
  anchored on ``sigmoid(z)`` with ``affine_source(z) = x`` reads x as the FFF input.

The structural classes only propose; every claim "this is affine in x" is checked by numbers
when the spec is extracted (graph_extract) and confirmed (graph_confirm).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx

SHAPE_ONLY = {
    "sym_size", "size", "dim", "numel", "ones_like", "zeros_like", "empty_like", "full_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "zeros", "ones", "empty", "full", "arange", "scalar_tensor",
    "empty_strided", "sym_numel", "sym_stride", "_assert_tensor_metadata", "rand_like", "randn_like",
    "getattr",   # fx: x.shape, x.device, x.dtype
}
# ops that only move, select, copy or cast elements of their (single) tensor input
MOVES = {
    "view", "reshape", "_unsafe_view", "transpose", "t", "permute", "unsqueeze", "squeeze", "slice", "select",
    "expand", "expand_as", "clone", "contiguous", "flatten", "unflatten", "alias", "detach", "lift_fresh_copy",
    "index_select", "gather", "index", "take", "repeat", "narrow", "split", "split_with_sizes", "chunk",
    "unbind", "getitem", "movedim", "swapaxes", "view_as", "reshape_as", "dropout", "to", "_to_copy",
    "type_as", "float", "double", "type", "identity", "copy",
}
# ops writing (moving) one tensor into another: affine in both
SCATTERS = {"select_scatter", "slice_scatter", "index_put", "scatter", "copy", "index_copy", "masked_scatter"}
AFFINE = MOVES | SCATTERS | {
    "neg", "mul", "div", "add", "sub", "rsub", "cat", "concat", "stack", "matmul", "mm", "bmm", "linear",
    "addmm", "einsum", "baddbmm", "sum", "mean", "where",
}
# ops whose output is linear in one operand when every other operand is constant
BILINEAR = {"mul", "div", "matmul", "mm", "bmm", "linear", "addmm", "einsum", "baddbmm"}

SOFT_DECISIONS = {"sigmoid", "expit", "special_expit", "log_sigmoid", "logsigmoid", "log_sigmoid_forward", "softplus"}
HARD_DECISIONS = {"gt", "ge"}


def op_name(node: fx.Node, module: Optional[torch.nn.Module] = None) -> str:
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target.overloadpacket.__name__
        if isinstance(target, torch._ops.OpOverloadPacket):
            return target.__name__
        return getattr(target, "__name__", str(target))
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module" and module is not None:
        try:
            return type(module.get_submodule(node.target)).__name__.lower()
        except AttributeError:
            return "module"
    return node.op


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The distinct nodes among a node's args and kwargs, in order."""
    seen: dict[fx.Node, None] = {}
    for n in node.all_input_nodes:
        seen.setdefault(n, None)
    return list(seen)


def meta_val(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def is_float_tensor(node: fx.Node) -> Optional[bool]:
    """True/False when the capture recorded the value; None when it did not (fx.symbolic_trace)."""
    val = meta_val(node)
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    return None if val is None else False


def hint_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    """The node's shape for the example inputs (symbolic dims read at their example value)."""
    val = meta_val(node)
    if not isinstance(val, torch.Tensor):
        return None
    out = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            hint = d.node.hint
            if hint is None:
                return None
            out.append(int(hint))
        else:
            out.append(int(d))
    return tuple(out)


class GraphFacts:
    """Per-node facts of one graph (see the module docstring), computed once in topological order."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.name = {n: op_name(n, gm) for n in self.nodes}
        self.depends: dict[fx.Node, bool] = {}
        self.affine_source: dict[fx.Node, Optional[fx.Node]] = {}
        self.touches_input: dict[fx.Node, bool] = {}      # reads a graph input, even only its shape
        for n in self.nodes:
            self.touches_input[n] = n.op == "placeholder" or any(self.touches_input[i] for i in n.all_input_nodes)
            self._visit(n)

    def _visit(self, n: fx.Node):
        name = self.name[n]
        inputs = tensor_inputs(n)
        if n.op == "placeholder":
            self.depends[n] = True
        elif n.op in ("get_attr", "output") or name in SHAPE_ONLY:
            self.depends[n] = n.op == "output" and any(self.depends[i] for i in inputs)
        else:
            self.depends[n] = any(self.depends[i] for i in inputs)
        if not self.depends[n]:
            self.affine_source[n] = None
            return
        live = [i for i in inputs if self.depends[i] and self.name[i] not in SHAPE_ONLY]
        sources = {self.affine_source[i] for i in live}
        affine = n.op != "placeholder" and name in AFFINE and len(sources) == 1 and None not in sources
        if affine and name in BILINEAR and len(live) > 1:
            affine = False
        if affine and name == "where":
            affine = bool(n.args) and isinstance(n.args[0], fx.Node) and not self.depends[n.args[0]]
        if n.op == "call_module" and name in ("linear", "dropout", "identity", "flatten"):
            affine = len(live) == 1
        self.affine_source[n] = next(iter(sources)) if affine else n

    def ancestors(self, roots, stop=None) -> set[fx.Node]:
        """Every node some root reads, transitively (roots included), not walking past ``stop``."""
        return _reach(roots, lambda n: () if stop is not None and n in stop else n.all_input_nodes)

    def descendants(self, roots) -> set[fx.Node]:
        """Every node that reads some root, transitively (roots included)."""
        return _reach(roots, lambda n: n.users)

    def value_descendants(self, roots) -> set[fx.Node]:
        """Nodes whose value depends on some root (not through shape-only ops)."""
        return _reach(roots, lambda n: (u for u in n.users if self.name[u] not in SHAPE_ONLY))


def _reach(roots, step) -> set[fx.Node]:
    """The roots and every node reached from them by ``step`` (a node -> its next nodes)."""
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen
