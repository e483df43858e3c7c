"""Build and save a TensorRT engine from a trt-target ONNX file: ``build_engine(onnx_path, engine_path)``.

Steps: import tensorrt; create a builder (this needs a CUDA GPU and driver); register the
fffcompile plugins (``runtime.trt``: Triton kernels compiled ahead of time into the engine)
unless ``plugins=False``, in which case TensorRT's parser inlines each fffcompile node's
model-local function (standard layers, slower, no Triton needed); parse the file into a
strongly typed network (dtypes as the file has them) with PREFER_AOT_PYTHON_PLUGINS; add one
optimization profile in which every dynamic input dimension ranges over ``dynamic_dims``
(min, opt, max); build; write the serialized engine to ``engine_path`` atomically.

Whatever is missing is reported as ``MissingDependencyError`` naming it (tensorrt, a GPU,
triton); a file TensorRT cannot parse or build as ``InvalidModelError`` with the parser's or
builder's own error messages (TensorRT's log is otherwise kept quiet). No partial engine file is ever left behind.

``build_with(trt, ...)`` is the same build with the TensorRT module passed in, so that the
steps can also be run with a sibling library of the same API (the tests run them with
``tensorrt_rtx``, which builds without a GPU but has no Python plugins).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Union

from ..errors import InvalidModelError, MissingDependencyError

DYNAMIC_DIMS = (1, 64, 4096)


@dataclass(frozen=True)
class BuiltEngine:
    path: Path
    size_bytes: int
    layers: int          # layers of the parsed network
    plugin_layers: int   # of which fffcompile plugins (0: every node was inlined from its local function)


def build_engine(onnx_path: Union[str, Path], engine_path: Union[str, Path], *, plugins: bool = True,
                 dynamic_dims: tuple[int, int, int] = DYNAMIC_DIMS) -> BuiltEngine:
    """Build the engine of ``onnx_path`` with TensorRT on this machine's GPU and save it to ``engine_path``."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise MissingDependencyError(
            f"TensorRT is not installed ({error}): building an engine needs NVIDIA TensorRT 10.8 or newer and a "
            "CUDA GPU; on such a machine: pip install 'tensorrt>=10.8' (see docs/tensorrt.md)") from error
    if plugins:
        from . import trt as _registers_the_plugins  # noqa: F401
    return build_with(trt, onnx_path, engine_path, dynamic_dims=dynamic_dims)


def build_with(trt: ModuleType, onnx_path: Union[str, Path], engine_path: Union[str, Path], *,
               dynamic_dims: tuple[int, int, int] = DYNAMIC_DIMS) -> BuiltEngine:
    """``build_engine``'s steps with the TensorRT module ``trt`` (whatever plugins it has registered)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise InvalidModelError(f"{onnx_path}: no such file")
    logger = _error_collector(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as error:  # TensorRT reports a missing GPU or driver as a failed constructor
        raise MissingDependencyError(f"TensorRT could not start a builder ({error}): it needs a CUDA GPU and driver "
                                     "on this machine") from error
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise InvalidModelError(f"{onnx_path}: TensorRT's ONNX parser rejected the file: {errors}")

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            dynamic = True
            low, opt, high = ([d if d >= 0 else bound for d in shape] for bound in dynamic_dims)
            profile.set_shape(tensor.name, low, opt, high)
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InvalidModelError(f"{onnx_path}: TensorRT could not build an engine: {'; '.join(logger.errors[-3:])}")

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=engine_path.parent, prefix=f".{engine_path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(memoryview(serialized))
        os.replace(temporary, engine_path)
    except BaseException:
        os.unlink(temporary)
        raise
    plugin_layers = sum(1 for i in range(network.num_layers)
                        if network.get_layer(i).type in (trt.LayerType.PLUGIN, trt.LayerType.PLUGIN_V2,
                                                         trt.LayerType.PLUGIN_V3))
    return BuiltEngine(engine_path, engine_path.stat().st_size, network.num_layers, plugin_layers)


def _error_collector(trt: ModuleType):
    """A TensorRT logger that keeps the error messages (for the one-line error) and prints nothing."""

    class Collector(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(message).strip())

    return Collector()
