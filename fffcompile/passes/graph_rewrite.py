"""Rewrite confirmed candidates to the fused op in a copy of the captured graph.

For each confirmed candidate (input x, output y, spec): a ``FusedFFF`` submodule holding the
spec's weights is called on x, its result (flattened to y's row layout when y flattens x's
leading dims) replaces every use of y, and the candidate's now-unused nodes are erased. Nothing
else in the graph is touched: every other node is the same op on the same arguments. The result
runs, has torch.ops.fffcompile.* inside when exported again, and keeps the capture's dynamic dims.

``hardened_original`` is a second copy of the captured graph in which the decisions of the
rewritten candidates are hardened (s(z) -> [z >= 0]) and their training-only dropout removed:
the whole-model exactness oracle.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..runtime.fused_module import FusedFFF
from ..spec import FFFSpec
from .graph_canonical import hint_shape
from .graph_cutout import harden_value


def _copy(gm: fx.GraphModule):
    graph = fx.Graph()
    mapping: dict = {}
    out = graph.graph_copy(gm.graph, mapping)
    graph.output(out)
    graph._codegen = gm.graph._codegen
    return graph, mapping


def rewrite(gm: fx.GraphModule, confirmed: list) -> fx.GraphModule:
    """confirmed: (candidate, cutout, y node, spec, where) tuples; returns a new GraphModule."""
    graph, mapping = _copy(gm)
    modules = {}
    for i, (cand, cut, y, spec, where) in enumerate(confirmed):
        name = f"fff_graph_{i}"
        while hasattr(gm, name) or name in modules:
            name += "_"
        modules[name] = FusedFFF(spec, where=where)
        new_x, new_y = mapping[cand.x], mapping[y]
        with graph.inserting_after(new_y):
            call = graph.call_module(name, (new_x,))
            result = call
            x_shape, y_shape = hint_shape(cand.x), hint_shape(y)
            if x_shape is not None and y_shape is not None and len(y_shape) == 2 and len(x_shape) > 2:
                with graph.inserting_after(call):
                    result = graph.call_function(torch.ops.aten.flatten.using_ints, (call, 0, -2))
        new_y.replace_all_uses_with(result)
        # erase the candidate's nodes that nothing reads any more (inner first)
        inside = set(cut.nodes)
        # metadata assertions about the candidate's own values go with it
        checks = [u for n in cut.nodes for u in n.users if u.op == "call_function" and not u.users
                  and cut.facts.name.get(u, "").startswith("_assert") and u not in inside]
        # constants the candidate read and what only they were computed from (a per-row torch.zeros index)
        constants = cut.facts.ancestors(cut.constant_nodes)
        order = cut.nodes + checks + sorted(constants, key=cut.facts.index.__getitem__)
        for old in sorted(order, key=cut.facts.index.__getitem__, reverse=True):
            node = mapping.get(old)
            if node is not None and not node.users and node.op != "placeholder":
                graph.erase_node(node)
                mapping.pop(old)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return _module(gm, graph, modules)


def _module(gm: fx.GraphModule, graph: fx.Graph, extra: dict) -> fx.GraphModule:
    """A GraphModule over ``graph`` sharing gm's parameters, buffers and submodules (no copies)."""
    root = dict(extra)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            root[node.target] = value
    result = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    result.recompile()
    return result


def hardened_original(gm: fx.GraphModule, confirmed: list) -> fx.GraphModule:
    graph, mapping = _copy(gm)
    from .graph_canonical import op_name
    for cand, cut, *_ in confirmed:
        for old in cut.nodes:          # training-only dropout inside the tree: the hardened form has none
            node = mapping.get(old)
            if node is None:
                continue
            if old.target is torch.ops.aten.dropout.default:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            elif old.target is torch.ops.aten.native_dropout.default:
                for user in list(node.users):
                    if user.target is operator.getitem and user.args[1] == 0:
                        user.replace_all_uses_with(node.args[0])
                        graph.erase_node(user)
                if not node.users:
                    graph.erase_node(node)
        if cand.kind != "soft":
            continue
        for d in cand.decisions:
            node = mapping[d]
            with graph.inserting_after(node):
                hard = graph.call_function(harden_value, (op_name(d, gm), node.args[0], "ge"))
            node.replace_all_uses_with(hard)
            graph.erase_node(node)
    return _module(gm, graph, {})
