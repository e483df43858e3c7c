#!/usr/bin/env bash
# Optional test dependency: SIMDe's headers (Debian's libsimde-dev), with which the kernel tests
# also run the C++ kernel's AVX-512 path on a CPU without AVX-512 (tests/kernel_builds.py).
# Never fails: without apt-get or root, those tests are skipped with a reason.
set -u
HEADER=/usr/include/simde/x86/avx512.h
[ -e "$HEADER" ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] &&
   { apt-get install -y -q libsimde-dev >/dev/null 2>&1 ||
     { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null 2>&1; }; }; then
    echo "libsimde-dev installed: the kernel tests also run the AVX-512 path, emulated"
else
    echo "libsimde-dev is not installed (needs apt-get as root): the emulated AVX-512 kernel tests will be skipped" >&2
fi
exit 0
