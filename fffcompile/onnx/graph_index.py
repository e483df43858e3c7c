"""Use-def index of an ONNX main graph, and cut-out submodels evaluated in ONNX Runtime.

The ONNX frontend reasons about tensors by who produces and who consumes them, never by their
names' meaning (generated names such as ``val_26`` or ``onnx::MatMul_117`` carry nothing).

- ``GraphIndex(model)``: producer node and consumer nodes of every tensor, node positions (the
  main graph is topologically sorted by the ONNX standard), the set of constant tensors
  (initializers that are not graph inputs, and outputs of nodes whose inputs are all constant),
  element types and ranks from shape inference.
- ``forward_from(x)``: the nodes whose value depends on tensor x.
- ``submodel(nodes, inputs, outputs)``: a standalone model of some nodes of the graph with the
  given tensors as graph inputs (their producers are left out) and outputs; what it needs of
  the initializers, functions and opset imports is copied.
- ``evaluate(model, feeds, outputs)``: ONNX Runtime on such a submodel.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import InvalidModelError

# Ops whose output is a shape or size only: their consumers do not see the input's values.
SHAPE_OPS = ("Shape", "Size")


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.inputs_of: list[list[str]] = [node_inputs(node) for node in self.nodes]
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
            for name in self.inputs_of[i]:
                self.consumers[name].append(i)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.constant: set[str] = {n for n in self.initializers if n not in self.graph_inputs}
        for node in self.nodes:
            ins = [i for i in self.inputs_of[self.position[id(node)]] if i]
            if node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                    "Multinomial", "Bernoulli") and all(i in self.constant for i in ins):
                self.constant.update(o for o in node.output if o)
        self.types: dict[str, onnx.TypeProto] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # shape inference is a convenience: unknown types stay unknown
            inferred = model
        for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            self.types[value.name] = value.type
        for name, tensor in self.initializers.items():
            self.types.setdefault(name, helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))

    # ------------------------------------------------------------------ queries
    def elem_type(self, name: str) -> int:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else 0

    def shape(self, name: str) -> Optional[list]:
        """Dims as ints or dim_param strings (None for an unknown dim); None when the rank is unknown."""
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]

    def producer_node(self, name: str) -> Optional[onnx.NodeProto]:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i]

    def consumer_nodes(self, name: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i in self.consumers.get(name, ())]

    def constant_value(self, name: str) -> Optional[np.ndarray]:
        """The value of a constant tensor (initializer, or a constant subgraph evaluated)."""
        if name not in self.constant:
            return None
        if name in self.initializers:
            return onnx.numpy_helper.to_array(self.initializers[name])
        nodes = sorted(self.backward_slice([name], stop=set()), key=lambda i: i)
        model = self.submodel(nodes, [], [name])
        return evaluate(model, {}, [name])[name]

    def forward_from(self, x: str) -> set[int]:
        """Indices of the nodes whose value depends on tensor ``x`` (shape-only consumers included)."""
        seen: set[int] = set()
        frontier = [x]
        while frontier:
            name = frontier.pop()
            for i in self.consumers.get(name, ()):
                if i not in seen:
                    seen.add(i)
                    frontier.extend(o for o in self.nodes[i].output if o)
        return seen

    def backward_slice(self, outputs: Iterable[str], stop: set[str], shape_barrier: Optional[set[int]] = None) -> set[int]:
        """Indices of the nodes ``outputs`` depend on, not crossing the tensors in ``stop``; with ``shape_barrier``
        (a set of node indices) the input of a Shape/Size node is not followed unless its producer is in it."""
        seen: set[int] = set()
        frontier = [o for o in outputs]
        visited: set[str] = set()
        while frontier:
            name = frontier.pop()
            if name in visited or name in stop:
                continue
            visited.add(name)
            i = self.producer.get(name)
            if i is None or i in seen:
                continue
            seen.add(i)
            node = self.nodes[i]
            if shape_barrier is not None and node.op_type in SHAPE_OPS and self.producer.get(node.input[0]) not in shape_barrier:
                continue
            frontier.extend(n for n in self.inputs_of[i] if n)
        return seen

    # ------------------------------------------------------------------ submodels
    def submodel(self, node_ids: Iterable[int], inputs: Sequence[str], outputs: Sequence[str],
                 input_shapes: Optional[Mapping[str, list]] = None) -> onnx.ModelProto:
        """A model of the given nodes (in graph order) taking ``inputs`` and returning ``outputs``."""
        inputs = list(inputs)
        cut = set(inputs)
        chosen = [self.nodes[i] for i in sorted(set(node_ids))]
        chosen = [n for n in chosen if not any(o in cut for o in n.output)]
        produced = {o for n in chosen for o in n.output} | cut
        needed = {i for n in chosen for i in node_inputs(n) if i and i not in produced}
        initializers = [self.initializers[n] for n in sorted(needed) if n in self.initializers]
        missing = sorted(needed - set(self.initializers))
        if missing:
            raise InvalidModelError(f"cannot cut out a subgraph: it reads {missing[:3]} produced elsewhere")
        graph_inputs = []
        for name in inputs:
            shape = (input_shapes or {}).get(name)
            if shape is None:
                known = self.shape(name)
                shape = None if known is None else [f"{name}_d{k}" for k in range(len(known))]
            graph_inputs.append(helper.make_tensor_value_info(name, self.elem_type(name) or onnx.TensorProto.FLOAT,
                                                              shape))
        graph = helper.make_graph([_copy(n) for n in chosen], "fff_cut", graph_inputs,
                                  [helper.make_empty_tensor_value_info(o) for o in outputs], initializer=initializers)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        model.functions.extend(self.model.functions)
        return model


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs (If/Loop/Scan bodies) read."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {i.name for i in sub.initializer}
            for n in sub.node:
                names.extend(i for i in node_inputs(n) if i and i not in inner)
    return names


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def evaluate(model, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Run ``model`` (a ModelProto or a ``make_session`` session) in ONNX Runtime; ``outputs`` by name."""
    session = make_session(model)
    return dict(zip(outputs, session.run(list(outputs), dict(feeds))))


def make_session(model: onnx.ModelProto):
    """A one-thread CPU session for probing a cut-out model (a cut-out that runs itself, ``traced_rows.Chunked``,
    is returned as is)."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        return model

    options = ort.SessionOptions()
    options.log_severity_level = 4       # a probe that does not run is a reason, not an error to print
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # ORT's graph optimizations would take the cut-out apart for nothing: probes run once.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
