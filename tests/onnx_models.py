"""Small ONNX models around fffcompile nodes, and runners for ONNX Runtime and onnx.reference (test helpers).

``fff_model(spec)`` is a model whose input x (B, d_in) (other leading dims: ``lead``) feeds one node from ``fff_node``; its
inputs and outputs are float32 for bfloat16 specs (Cast in, Cast out: bfloat16 values are
exact in float32, and numpy has no bfloat16 to feed ONNX Runtime with).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
import torch
from onnx import helper

from fffcompile.onnx import fff_node, insert_fff_nodes
from fffcompile.onnx.contract import onnx_dtype


def fff_model(spec, opset: int = 18, target: str = "onnx", lead=("B",)) -> onnx.ModelProto:
    dtype = onnx_dtype(spec.dtype)
    outer = onnx.TensorProto.FLOAT if spec.dtype == torch.bfloat16 else dtype
    nodes, x, y = [], "x", "y"
    if outer != dtype:
        nodes.append(helper.make_node("Cast", ["x"], ["x_cast"], to=dtype))
        nodes.append(helper.make_node("Cast", ["y_fff"], ["y"], to=outer))
        x, y = "x_cast", "y_fff"
    graph = helper.make_graph(nodes, "fff", [helper.make_tensor_value_info("x", outer, [*lead, spec.d_in])],
                              [helper.make_tensor_value_info("y", outer, [*lead, spec.d_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return insert_fff_nodes(model, [fff_node(spec, x, y, target=target, name="fff")])


def feed(x: torch.Tensor) -> np.ndarray:
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def run_ort(model: onnx.ModelProto, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": feed(x)})[0])


def run_reference(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(onnx.reference.ReferenceEvaluator(model).run(None, {"x": feed(x)})[0]))
