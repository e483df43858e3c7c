"""The CPU implementation of ``torch.ops.fffcompile.leaf_mlp_tree`` and ``neuron_tree``: a C++ kernel.

The kernel (``csrc/fff_kernels.cpp``, body in ``csrc/fff_body.h``) computes exactly
``reference.hard``: form A descends n = 2n + 1 + [z_n >= 0] (tie "ge") or [z_n > 0] (tie "gt")
and runs the leaf's MLP (or linear leaf), form B sums act(a_{p,n}) V_{p,n} over the D + 1
neurons of each tree's path; float32/float64 in their own type, bfloat16/float16 accumulated in
float32 and rounded once; float32 x with bfloat16 weights (``prepare(..., weights="bf16")``, the
optional reduced-precision copy) computes in float32 on the rounded weights. AVX-512 / AVX2+FMA / scalar chosen at run time. Small batches (always
batch 1) descend one row at a time, four rows interleaved; large batches (form B from 2048 rows,
form A's routing from 128) run the top levels per row, bucket the rows by subtree and descend each
subtree level by level, each node's weight rows loaded once for all of its rows. Threads take
chunks of rows (or buckets) from a shared counter, one thread for a single chunk; form A's rows
are grouped by leaf so each leaf MLP runs as small GEMMs.

Building: ``torch.utils.cpp_extension.load`` compiles the sources with ninja on the first call
(never at import) into torch's extension directory under a name keyed by the sources' hash and
the torch version, so an edited source or another torch rebuilds and an unchanged one loads from
the cache (a lock left by a build killed half-way is removed once it is 15 minutes old). The
first build takes about a minute; ``load()`` warms it ahead of time. When the compiler or ninja
is missing or the build fails, the reason is logged once and every call runs ``reference.hard``
(the ops' pure-torch default): never an exception. ``FFFCOMPILE_CPU_KERNEL=0`` disables it.

Registered with ``torch.library.register_kernel(op, "cpu")`` on the existing custom ops, so the
ops' fake function and autograd formula stay as they are. ``refusal(...)`` says why a call goes
to the reference instead (x's dtype differs from the weights', an activation the kernel does not
know, the kernel unavailable); ``prepare`` gives ``FusedFFF`` a handle that skips the dispatcher
(one C++ call per forward; under autograd FusedFFF wraps it in a Function with the op's backward).

Measured on the development machine (AMD Zen 3, AVX2, one thread, shared and noisy; commands
``fffcompile bench`` and ``benchmarks/kernel_micro.py``; details in csrc/fff_kernels.cpp's header):
UltraFastBERT 1x11 shape about 4-11 us per token at batch 1 through the handle and 3-4.5 us per
row at batch >= 128; form A (d 768, depth 8, leaf width 16) about 15-20 us at batch 1 and 3.5-6 us
per row at batch 1024. Both are bound by streaming the tree's rows from L3/DRAM, not by arithmetic.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..ops import spec_from_leaf_mlp_args, spec_from_neuron_tree_args

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("fff_kernels.cpp", "fff_body.h")

# The kernel's activation codes (csrc/fff_kernels.cpp, enum Activation).
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "sigmoid": 4, "tanh": 5, "relu2": 6, "identity": 7}
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# ``isa`` argument of the extension: -1 the best the CPU has, else at most this one.
ISAS = {"best": -1, "scalar": 0, "avx2": 1, "avx512": 2}

_lock = threading.Lock()
_extension = None
_failure: Optional[str] = None
_disabled = os.environ.get("FFFCOMPILE_CPU_KERNEL", "1") == "0"


# -fopenmp at compile time only: at::parallel_for is inline OpenMP in ATen's headers (torch's CPU build
# uses OpenMP), so without it every parallel_for of the kernel runs on one thread. The GOMP symbols
# resolve at load time to the libgomp torch has already loaded globally, so torch.set_num_threads
# and the kernel share one thread pool.
CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]


# Tests only: the AVX-512 path compiled over SIMDe's portable AVX-512 (csrc/avx512_emulated.h) and
# always chosen, so it runs on a CPU without AVX-512 (``load_emulated_avx512``).
EMULATED_AVX512_CFLAGS = CFLAGS + ["-DFFF_EMULATE_AVX512"]
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")


def _extension_name(cflags=CFLAGS, prefix="fffcompile_cpu") -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    digest.update(" ".join(cflags).encode())
    for name in SOURCES + (("avx512_emulated.h",) if cflags is EMULATED_AVX512_CFLAGS else ()):
        digest.update((CSRC / name).read_bytes())
    return f"{prefix}_{digest.hexdigest()[:12]}"


def _build(name: str, cflags: list):
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    _remove_stale_lock(cpp_extension, name)
    return cpp_extension.load(name=name, sources=[str(CSRC / "fff_kernels.cpp")], extra_include_paths=[str(CSRC)],
                              extra_cflags=cflags, verbose=os.environ.get("FFFCOMPILE_BUILD_VERBOSE") == "1")


def load_emulated_avx512():
    """Tests only: a separate build of the kernel whose AVX-512 path runs on SIMDe's portable AVX-512
    (``ext.isa() == "avx512"`` on any CPU), or raise RuntimeError saying what is missing. Slow; the
    numbers are the AVX-512 path's own (same code, same lane count and summation order)."""
    if not SIMDE_HEADER.exists():
        raise RuntimeError(f"SIMDe is not installed ({SIMDE_HEADER} missing: apt-get install libsimde-dev)")
    return _build(_extension_name(EMULATED_AVX512_CFLAGS, "fffcompile_cpu_avx512emu"), EMULATED_AVX512_CFLAGS)


def load():
    """The compiled extension module (building it on first use), or None with ``failure()`` saying why."""
    global _extension, _failure
    if _extension is not None or _failure is not None:
        return _extension
    with _lock:
        if _extension is not None or _failure is not None:
            return _extension
        if _disabled:
            _failure = "disabled by FFFCOMPILE_CPU_KERNEL=0"
            return None
        try:
            _extension = _build(_extension_name(), CFLAGS)
        except Exception as error:  # compiler missing, build failure: fall back, say it once
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            _failure = f"{type(error).__name__}: {first_line}"
            log.warning("fffcompile: CPU kernel unavailable (%s); the ops run the pure-torch reference on CPU", _failure)
    return _extension


# A build killed half-way leaves torch's lock file behind, and every later build would wait on it
# forever; no build of these sources takes this long.
STALE_LOCK_SECONDS = 15 * 60


def _remove_stale_lock(cpp_extension, name: str):
    try:
        directory = cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # a private helper: without it, torch's own waiting applies
        return
    lock = os.path.join(directory, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
            os.remove(lock)
            log.warning("fffcompile: removed a stale build lock %s (left by an interrupted build)", lock)
    except OSError:
        pass


def available() -> bool:
    """Whether the C++ kernel is (or can be) loaded; builds it on the first call."""
    return load() is not None


def failure() -> Optional[str]:
    """Why the kernel could not be loaded (None while it is loaded or not yet tried)."""
    return _failure


def isa() -> Optional[str]:
    """The instruction set the kernel runs on this CPU ('avx512', 'avx2', 'scalar'), None when unavailable."""
    ext = load()
    return ext.isa() if ext is not None else None


def refusal(x: Tensor, weights: tuple, activation: str) -> Optional[str]:
    """Why the kernel would not run this call (None when it would); the reference runs instead."""
    if activation not in ACTIVATION_CODES:
        return f"activation {activation!r} has no C++ implementation"
    dtype = weights[0].dtype
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported"
    if any(w is not None and w.dtype != dtype for w in weights):
        return "the weights mix dtypes"
    if x.dtype != dtype:
        return f"x is {x.dtype}, the weights {dtype}"
    if load() is None:
        return f"the C++ kernel is unavailable ({_failure})"
    return None


# Set by tests to see which implementation ran the last call: "kernel" or "reference".
last_path: Optional[str] = None


@torch.library.register_kernel("fffcompile::leaf_mlp_tree", "cpu")
def leaf_mlp_tree_cpu(x: Tensor, node_weight: Tensor, node_bias: Tensor, leaf_w1: Tensor, leaf_b1: Tensor,
                      leaf_w2: Optional[Tensor], leaf_b2: Optional[Tensor], activation: str, tie: str) -> Tensor:
    global last_path
    if refusal(x, (node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2), activation) is None:
        last_path = "kernel"
        return _extension.leaf_mlp_tree(x, node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2,
                                        ACTIVATION_CODES[activation], tie == "ge")
    last_path = "reference"
    spec = spec_from_leaf_mlp_args(node_weight, node_bias, leaf_w1, leaf_b1, leaf_w2, leaf_b2, activation, tie)
    return reference.hard(spec, x)


@torch.library.register_kernel("fffcompile::neuron_tree", "cpu")
def neuron_tree_cpu(x: Tensor, node_weight: Tensor, node_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
                    activation: str, tie: str) -> Tensor:
    global last_path
    if refusal(x, (node_weight, node_bias, out_weight, out_bias), activation) is None:
        last_path = "kernel"
        return _extension.neuron_tree(x, node_weight, node_bias, out_weight, out_bias,
                                      ACTIVATION_CODES[activation], tie == "ge")
    last_path = "reference"
    spec = spec_from_neuron_tree_args(node_weight, node_bias, out_weight, out_bias, activation, tie)
    return reference.hard(spec, x)


WEIGHT_MODES = (None, "bf16")


def round_weight(t: Optional[Tensor], weights: Optional[str]) -> Optional[Tensor]:
    """The weight as the kernel uses it: unchanged (weights=None), or rounded to bfloat16 and back
    ("bf16", the reduced-precision copy) so that the reference computes what the kernel does."""
    if t is None or weights is None:
        return t
    return t.to(torch.bfloat16).to(t.dtype)


def prepare(form: str, node_weight: Tensor, node_bias: Tensor, a: Tensor, b: Tensor, leaf_w2: Optional[Tensor],
            leaf_b2: Optional[Tensor], activation: str, tie: str, weights: Optional[str] = None):
    """A C++ handle holding one layer's weights, ``handle(x) -> y`` (the op without the dispatcher), or
    None when the kernel would not run them (not loaded, not CPU, mixed dtypes, unknown activation).

    ``a, b`` are (leaf_w1, leaf_b1) for form A and (out_weight, out_bias) for form B. The handle keeps
    the very tensors, so in-place updates (and ``param.data = ...``) are seen; a caller that replaces
    a parameter object must prepare again. Callers guarantee no autograd and no tracing, and x of the
    weights' dtype on CPU (the C++ side checks dtype and shape and raises otherwise).

    weights="bf16" (float32 weights only, else None): the handle keeps a bfloat16 copy of the weights,
    rebuilt when a source tensor changes, and runs the kernel on it with float32 x, sums and output,
    i.e. ``reference.hard`` of the spec whose weights pass through ``round_weight``.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    tensors = [t for t in (node_weight, node_bias, a, b, leaf_w2, leaf_b2) if t is not None]
    if activation not in ACTIVATION_CODES or any(t.device.type != "cpu" for t in tensors):
        return None
    if len({t.dtype for t in tensors}) != 1 or node_weight.dtype not in DTYPES:
        return None
    if weights == "bf16" and node_weight.dtype != torch.float32:
        return None
    ext = load()
    if ext is None:
        return None
    return ext.Prepared(form == "leaf_mlp", node_weight, node_bias, a, b, leaf_w2, leaf_b2,
                        ACTIVATION_CODES[activation], tie == "ge", weights == "bf16")
