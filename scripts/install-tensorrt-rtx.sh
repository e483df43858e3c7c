#!/usr/bin/env bash
# Optional test dependency: the tensorrt-rtx wheel, which lets tests/test_tensorrt_rtx.py parse
# and build engines of trt-target ONNX files without a GPU (a sibling product of TensorRT, not a
# TensorRT run). Never fails: where the wheel does not install, those tests skip with a reason.
#
#   usage: scripts/install-tensorrt-rtx.sh PYTHON [extra pip flags...]
set -u
PY="${1:?usage: $0 PYTHON [pip flags...]}"
shift
VERSION="1.7.1.116"
if "$PY" -m pip install --quiet "$@" "tensorrt-rtx==${VERSION}"; then
    echo "tensorrt-rtx ${VERSION} installed: tests marked tensorrt_rtx will run"
else
    echo "tensorrt-rtx ${VERSION} did not install here: tests marked tensorrt_rtx will be skipped" >&2
fi
exit 0
