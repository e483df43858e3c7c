"""What the TensorRT entry points say where TensorRT is not installed (this project's machines).

Where it is installed (a GPU host) these checks do not apply and are skipped; the engine build
itself is exercised with the tensorrt-rtx wheel in test_tensorrt_rtx.py.
"""
import importlib
import importlib.util

import pytest

from fffcompile.errors import MissingDependencyError
from fffcompile.runtime.trt_engine import build_engine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                reason="TensorRT is installed here: the missing-dependency messages do not apply")


def test_build_engine_names_what_is_missing_and_writes_nothing(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(MissingDependencyError, match=r"TensorRT is not installed .*pip install 'tensorrt>=10.8'"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_importing_the_plugins_without_tensorrt_is_a_missing_dependency():
    with pytest.raises(MissingDependencyError, match="tensorrt.plugin is not importable"):
        importlib.import_module("fffcompile.runtime.trt")
