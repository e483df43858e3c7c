"""Refuse a region that is only part of a larger soft mixture on the same input.

A soft tree mixes its leaves with path weights that are products of its router sigmoids s(x W + b).
When a candidate's region X -> Y holds only some of those routers, the rest stay soft after a
rewrite while the rewritten part is hard: the model is then neither the soft original nor the hard
FFF (a depth-3 tree whose first two levels are confirmed as a depth-2 tree with "sigmoid leaves").
Confirmation cannot see this (the cut-out region, with the candidate's sigmoids hardened, is
reproduced exactly), nor can the whole-model check (it hardens only the rewritten routers). So a
confirmed region is still refused when

1. it contains a router-like sigmoid of X (``detect.router_source``: a sigmoid of a projection of
   the same X, not SiLU, not of a constant) that is none of its anchors nor one of the sigmoids the
   candidate reads as its leaves' activation (``detect.leaf_activation``): that sigmoid would stay soft
   inside the fused op; or
2. Y, through layout ops only, is read by a product (Mul, Div, MatMul, Gemm, Einsum) whose other
   operand depends on a router-like sigmoid of the same X outside the region: Y is a path weight
   (or part of the mixture) that another soft decision goes on to modulate.

It must not fire on a whole tree followed by a residual add, a projection of Y by weights, form C's
blend s(k) (a sigmoid of a constant) or a SiLU; two trees on one X meet by a sum after both, which
passes too. Only soft (form A / C) candidates are checked: a neuron tree's or a hard descent's anchors
are comparisons, and a sigmoid in their activation (x s(1.702 x)) is no router. A gate s(x G) multiplying a whole FFF's output is refused as well (conservative: the
gate's role cannot be told from the graph's structure).
"""
from __future__ import annotations

from .graph_index import GraphIndex
from .linear_chains import static_tensors
from .region import Region

_PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Expand", "Tile", "Cast")
_PRODUCTS = ("Mul", "Div", "MatMul", "Gemm", "Einsum")


def same_input(index: GraphIndex, x: str) -> set[str]:
    """``x`` and the tensors it is a reshaped view of (one input, seen through layout views)."""
    from .region import layout_ancestors
    return {x, *layout_ancestors(index, x)}


def router_sigmoids(index: GraphIndex, x: str, static: set[str] | None = None) -> list[int]:
    """The Sigmoid nodes whose input is a projection of ``x`` or of a tensor x is a view of (router-like)."""
    from .detect import router_source
    static = static_tensors(index) if static is None else static
    sources = same_input(index, x)
    return [i for i, n in enumerate(index.nodes) if n.op_type == "Sigmoid" and router_source(index, i, static) in sources]


def soft_routers_mixing(index: GraphIndex, x: str, anchors: list[int], region: Region,
                        leaf_sigmoids: list[int] = ()) -> str:
    """Why ``region`` (with router sigmoids ``anchors`` of ``x``) is part of a larger soft mixture, or "".
    ``leaf_sigmoids``: sigmoids of x the candidate reads as its leaves' activation (``detect.leaf_activation``):
    neither decisions nor other routers; the numbers decide whether that reading holds."""
    from .detect import router_source
    static = static_tensors(index)
    anchors = set(anchors) | set(leaf_sigmoids)
    inside = [i for i in sorted(region.x_nodes) if index.nodes[i].op_type == "Sigmoid" and i not in anchors
              and router_source(index, i, static) in same_input(index, x)]
    if inside:
        names = ", ".join(repr(index.nodes[i].name or index.nodes[i].output[0]) for i in inside[:4])
        return (f"at {region.y!r}: the region holds soft sigmoid(s) of a projection that are not its decisions ({names}): "
                f"part of a larger mixture, not rewritten")
    routers = set(router_sigmoids(index, x, static)) - region.x_nodes - anchors
    if not routers:
        return ""
    seen, frontier = set(), [region.y]
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for i in index.consumers.get(t, ()):
            node = index.nodes[i]
            if node.op_type in _PASS_THROUGH:
                frontier.extend(o for o in node.output if o)
            elif node.op_type in _PRODUCTS:
                others = [n for n in index.inputs_of[i] if n and n not in seen]
                hit = sorted(index.backward_slice(others, stop={x, region.x, region.y}) & routers)
                if hit:
                    names = ", ".join(repr(index.nodes[k].name or index.nodes[k].output[0]) for k in hit[:4])
                    return (f"at {region.y!r}: its output is multiplied ({node.op_type} {node.name or node.output[0]!r}) "
                            f"by a value of soft sigmoid(s) of the same input ({names}): part of a larger mixture, "
                            f"not rewritten")
    return ""
