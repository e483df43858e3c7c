"""Put fffcompile nodes into a model and make the model self-contained: functions, imports, IR version.

- ``insert_fff_nodes(model, fff_nodes)``: add the nodes (``node.fff_node``) and their
  initializers to the main graph, then ``attach_functions``; the graph is re-sorted
  topologically (stable), so a node may be appended after the consumers of its output.
- ``attach_functions(model, target=None)``: for every fffcompile node of the main graph, read
  its configuration (attributes, input count, the element type and tree count of its weight
  initializers), set its ``overload``, add one FunctionProto per configuration (deduplicated
  by (domain, name, overload); existing ones are rebuilt for the model's opset), import
  ("fffcompile", 1), raise the IR version to 10.
- ``raise_opset(model)``: the model at ai.onnx opset ``MIN_OPSET`` or later (``onnx.version_converter``);
  a frontend calls it on the original before rewriting (the converter cannot see through
  fffcompile nodes, nor through a graph whose FFF output is momentarily undefined). With ``target`` the plugin attributes are set ("trt")
  or removed ("onnx"). Models from ``fffcompile.export`` and from the ONNX frontend both end here.
- ``fff_configurations(model)``: the configurations per op_type, to tell whether consumers that
  key local functions by name alone can run the model (``contract``).

Nothing here changes what the rest of the graph computes.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Iterable, Optional

import onnx
from onnx import helper

from ..errors import InvalidModelError
from .contract import (ATTRIBUTES, DOMAIN, DOMAIN_VERSION, MIN_IR_VERSION, MIN_OPSET, NEURON_TREE, NodeConfig, check_target,
                       config_of_node, is_fff_node, node_attributes)
from .function_body import build_function


def model_opset(model: onnx.ModelProto, domain: str = "") -> Optional[int]:
    for opset in model.opset_import:
        if opset.domain in ((domain, "ai.onnx") if domain == "" else (domain,)):
            return opset.version
    return None


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain == domain:
            opset.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def raise_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at ai.onnx opset ``MIN_OPSET`` at least; call it before fffcompile nodes are added (the
    version converter cannot see through them)."""
    current = model_opset(model)
    if current is None:
        _set_opset(model, "", MIN_OPSET)
        return model
    if current >= MIN_OPSET:
        return model
    if any(is_fff_node(n) for n in model.graph.node):
        raise InvalidModelError(f"the model uses ai.onnx opset {current} and already holds fffcompile nodes; "
                                f"convert it to opset {MIN_OPSET} or later before inserting them")
    try:
        converted = onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as error:
        raise InvalidModelError(f"the model uses ai.onnx opset {current}; the fffcompile function body needs "
                                f"{MIN_OPSET} or later and onnx's version converter failed "
                                f"({type(error).__name__}: {error}); re-export the model at opset >= {MIN_OPSET}") from error
    return converted


def _weight_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Element type and shape of every initializer, Constant output and typed value of the main graph."""
    types: dict[str, tuple[int, tuple]] = {}
    for init in model.graph.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = (attr.t.data_type, tuple(attr.t.dims))
    for value in (*model.graph.input, *model.graph.value_info):
        tensor = value.type.tensor_type
        if value.name not in types and tensor.elem_type:
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            types[value.name] = (tensor.elem_type, dims)
    return types


def _config_of(node: onnx.NodeProto, types: dict) -> NodeConfig:
    where = node.name or node.output[0]
    weight = node.input[1] if len(node.input) > 1 else ""
    if weight not in types:
        raise InvalidModelError(f"fffcompile node {where!r}: its node_weight {weight!r} is neither an initializer "
                                f"nor a typed value of the main graph")
    elem_type, dims = types[weight]
    trees = None
    if node.op_type == NEURON_TREE:
        if len(dims) != 3 or dims[0] is None:
            raise InvalidModelError(f"NeuronTree node {where!r}: node_weight must have a static shape (P, n, d_in), "
                                    f"got {dims}")
        trees = dims[0]
    return config_of_node(node, elem_type, trees)


def fff_configurations(model: onnx.ModelProto) -> dict[str, set[NodeConfig]]:
    """Configurations of the main graph's fffcompile nodes, by op_type."""
    types = _weight_types(model)
    found: dict[str, set[NodeConfig]] = defaultdict(set)
    for node in model.graph.node:
        if is_fff_node(node):
            found[node.op_type].add(_config_of(node, types))
    return dict(found)


def attach_functions(model: onnx.ModelProto, target: Optional[str] = None) -> onnx.ModelProto:
    """Complete every fffcompile node of ``model`` (in place where possible; returns the model to use)."""
    if target is not None:
        check_target(target)
    if not any(is_fff_node(n) for n in model.graph.node):
        return model
    opset = model_opset(model) or 0
    if opset < MIN_OPSET:
        raise InvalidModelError(f"the model uses ai.onnx opset {opset}; the fffcompile function body needs "
                                f"{MIN_OPSET} or later; convert the original first (raise_opset)")
    types = _weight_types(model)
    configs: dict[str, NodeConfig] = {}
    for node in model.graph.node:
        if not is_fff_node(node):
            continue
        config = _config_of(node, types)
        node.overload = config.overload
        if target is not None:
            keep = node_attributes(config, target)
            others = [a for a in node.attribute if a.name not in ATTRIBUTES]
            del node.attribute[:]
            node.attribute.extend(others + [helper.make_attribute(k, v) for k, v in keep.items()])
        configs[config.overload + "/" + config.op_type] = config
    wanted = {(DOMAIN, c.op_type, c.overload): c for c in configs.values()}
    kept = [f for f in model.functions if (f.domain, f.name, f.overload) not in wanted]
    del model.functions[:]
    model.functions.extend(kept + [build_function(c, opset) for c in wanted.values()])
    _set_opset(model, DOMAIN, DOMAIN_VERSION)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so that producers precede consumers; among ready nodes the original order wins."""
    produced_by: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                produced_by[out] = index
    nodes = list(graph.node)
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for k, node in enumerate(nodes):
        for dep in {produced_by[i] for i in _node_inputs(node) if i in produced_by and produced_by[i] != k}:
            users[dep].append(k)
            waiting[k] += 1
    ready = [k for k in range(len(nodes)) if not waiting[k]]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for user in users[k]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise InvalidModelError("the graph has a cycle after inserting the fffcompile node")
    del graph.node[:]
    graph.node.extend(order)


def _node_inputs(node: onnx.NodeProto) -> Iterable[str]:
    """Inputs of a node, including the outer-scope values its subgraphs read."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {i.name for i in sub.initializer}
            for n in sub.node:
                yield from (i for i in _node_inputs(n) if i not in inner)


def insert_fff_nodes(model: onnx.ModelProto, fff_nodes, target: Optional[str] = None) -> onnx.ModelProto:
    """Add ``fff_nodes`` (from ``fff_node``) and their initializers to ``model``; returns the completed model.

    The model must be at ai.onnx opset ``MIN_OPSET`` or later: convert the original first (``raise_opset``).
    """
    existing = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output} \
        | {i.name for i in model.graph.input}
    for fff in fff_nodes:
        clash = [i.name for i in fff.initializers if i.name in existing]
        if clash:
            raise InvalidModelError(f"cannot insert fffcompile node {fff.node.name!r}: the model already has "
                                    f"values named {clash[:3]}; pass a unique name= to fff_node")
        model.graph.initializer.extend(fff.initializers)
        model.graph.node.append(fff.node)
        existing |= {i.name for i in fff.initializers}
    topological_sort(model.graph)
    return attach_functions(model, target)
