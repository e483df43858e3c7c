"""fffcompile's ONNX lowering: the fused FFF node, its standard-op body, torch export, ORT verification.

- ``contract``: the node contract (domain ``fffcompile`` v1, ``LeafMLPTree`` / ``LeafLinearTree`` / ``NeuronTree``).
- ``function_body.build_function``: the standard-op descent as a model-local function.
- ``node.fff_node`` and ``attach.insert_fff_nodes`` / ``attach.attach_functions``: put nodes in a model.
- ``export.export`` (also ``fffcompile.export``): torch model -> ONNX file with fused nodes.
- ``harden.harden_sigmoids`` and ``verify.verify_models``: exactness and fidelity in ONNX Runtime.
- ``files``: atomic writes and clear refusals of unreadable files.
- ``onnx_frontend.optimize_onnx``: the ONNX frontend (``detect``, ``region``, ``extract_leaf_tree``,
  ``extract_neuron_tree``, ``confirm``): an ONNX model in, its FFFs rewritten to fffcompile nodes out.

Importing this package does not import onnxscript or torch's exporter; ``export`` does.
"""
from .attach import attach_functions, fff_configurations, insert_fff_nodes
from .contract import DOMAIN, LEAF_LINEAR_TREE, LEAF_MLP_TREE, NEURON_TREE, NodeConfig
from .files import load_model, save_model_atomic
from .function_body import build_function
from .harden import harden_sigmoids
from .node import FFFNode, fff_node
from .verify import ModelVerification, generate_inputs, load_inputs, verify_models


def optimize_onnx(model, target="onnx", **options):
    """See ``fffcompile.onnx.onnx_frontend.optimize_onnx``."""
    from .onnx_frontend import optimize_onnx as _optimize_onnx
    return _optimize_onnx(model, target, **options)


def export(model, example_inputs, path, **options):
    """See ``fffcompile.onnx.export.export``."""
    from .export import export as _export
    return _export(model, example_inputs, path, **options)


__all__ = ["DOMAIN", "LEAF_MLP_TREE", "LEAF_LINEAR_TREE", "NEURON_TREE", "NodeConfig", "FFFNode", "fff_node", "insert_fff_nodes",
           "attach_functions", "fff_configurations", "build_function", "harden_sigmoids", "verify_models",
           "ModelVerification", "generate_inputs", "load_inputs", "load_model", "save_model_atomic", "export", "optimize_onnx"]
