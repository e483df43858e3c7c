"""The builds of the C++ kernel that the kernel tests run: ``native`` (the scalar path and the best
instruction set of this CPU) and ``avx512-emulated`` (``cpu_kernel.load_emulated_avx512``: the AVX-512
path, fff_body.h at 16 float lanes, on SIMDe's portable AVX-512), so that the code an AVX-512 CPU runs
is checked on a CPU without it. The emulated build is skipped, with the reason, where SIMDe is not
installed (``make`` installs Debian's libsimde-dev where it can); it fails where it does not compile.
"""
import pytest

from fffcompile.runtime import cpu_kernel

BUILDS = ("native", "avx512-emulated")
_loaded = {}


def load(build: str):
    if build not in _loaded:
        if build == "native":
            module = cpu_kernel.load()
            assert module is not None, f"the CPU kernel failed to build: {cpu_kernel.failure()}"
        else:
            if not cpu_kernel.SIMDE_HEADER.exists():
                pytest.skip(f"SIMDe is not installed ({cpu_kernel.SIMDE_HEADER}): the AVX-512 path is not emulated here")
            module = cpu_kernel.load_emulated_avx512()
            assert module.isa() == "avx512"
        _loaded[build] = module
    return _loaded[build]


def isas(ext):
    """Instruction sets to test on this build: the emulated build's AVX-512 path; natively scalar, and the
    best this CPU runs when that is not scalar."""
    if ext is _loaded.get("avx512-emulated"):
        return ["avx512"]
    best = ext.isa()
    return ["scalar"] + ([best] if best != "scalar" else [])
