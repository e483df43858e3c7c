"""Reading and writing ONNX files the way a compiler must: clear refusals, atomic writes.

- ``load_model(path)``: a ModelProto with its external data, or ``InvalidModelError`` with one
  line saying what is wrong (missing, a directory, empty, truncated or not ONNX at all).
- ``save_model_atomic(model, path)``: the file appears complete or not at all. The model (and,
  for large models, its external data file ``<name>.data`` next to it) is written into a
  temporary directory beside the target and renamed into place; on any failure the temporary
  directory is removed and an existing file at ``path`` is left as it was. Models whose tensors
  exceed ``EXTERNAL_DATA_BYTES`` (protobuf cannot hold 2 GiB) are written with external data.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional

import onnx
from google.protobuf.message import DecodeError

from ..errors import InvalidModelError, UserError

EXTERNAL_DATA_BYTES = 1 << 30


def load_model(path: str, load_external_data: bool = True) -> onnx.ModelProto:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InvalidModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InvalidModelError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise InvalidModelError(f"{path}: the file is empty")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise InvalidModelError(f"{path}: not a readable ONNX model (truncated or another format: {error})") from error
    except (OSError, onnx.checker.ValidationError) as error:   # (onnx refuses a missing data file this way)
        raise InvalidModelError(f"{path}: cannot read the model or its external data ({error})") from error
    if not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph or no opset import)")
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the main graph's initializers (raw or typed fields)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def check_output_path(path: str) -> str:
    """``path`` as a string, refused with a clear line when its directory does not exist."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{path}: the output directory {directory} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; give a file name for the output model")
    return path


def save_model_atomic(model: onnx.ModelProto, path: str, external_data: Optional[bool] = None,
                      check: Optional[Callable[[str], None]] = None) -> list[str]:
    """Write ``model`` to ``path`` atomically; returns the paths written (model first, then its data file).

    ``external_data`` None chooses by size. With external data the model's tensors are converted in
    place to refer to the data file. ``check(staged_path)`` runs on the complete staged file before
    it is moved into place; if it raises, nothing is written.
    """
    path = check_output_path(path)
    directory, name = os.path.split(os.path.abspath(path))
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_BYTES
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=directory)
    try:
        staged = os.path.join(staging, name)
        data_name = f"{name}.data"
        if external_data:
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, staged)
        if check is not None:
            check(staged)
        written = []
        if external_data and os.path.exists(os.path.join(staging, data_name)):
            os.replace(os.path.join(staging, data_name), os.path.join(directory, data_name))
            written.append(os.path.join(directory, data_name))
        os.replace(staged, path)
        return [path] + written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
