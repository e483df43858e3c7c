"""Form B batch-1 latency per prefetch mode of the CPU kernel (UltraFastBERT 1x11 shape, 1 thread).

Interleaved rounds (every mode once per round, fresh tokens every call), median and 10th
percentile per mode; each mode's output is first checked against ``reference.hard``. Modes
(csrc/fff_kernels.cpp, ``child_mode``): 0 no software prefetch, 1 the first 256 bytes of both
children's W rows (the default), 2 both children's whole rows a level ahead.

    PYTHONPATH=. taskset -c 1 python benchmarks/child_prefetch.py [rounds] [modes, e.g. 0,1,2]
"""
import statistics
import sys
import time

import torch

from fffcompile import FFFSpec, reference
from fffcompile.runtime import cpu_kernel


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    modes = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "0,1").split(",")]
    torch.set_num_threads(1)
    ext = cpu_kernel.load()
    if ext is None:
        sys.exit(f"the CPU kernel is unavailable: {cpu_kernel.failure()}")
    torch.manual_seed(0)
    d, depth = 768, 11
    n = 2 ** (depth + 1) - 1
    nw, nb = torch.randn(1, n, d) / d ** 0.5, torch.randn(1, n) * 0.1
    ow, ob = torch.randn(1, n, d) / 40, torch.randn(d) * 0.1
    spec = FFFSpec("neuron_tree", depth, "gelu", nw, nb, out_weight=ow, out_bias=ob, tie="gt")
    handle = ext.Prepared(False, nw, nb, ow, ob, None, None, cpu_kernel.ACTIVATION_CODES["gelu"], False)
    xs = torch.randn(4096, 1, d)
    for mode in modes:
        ext._tune(mode, 2)
        err = max((handle(xs[i]) - reference.hard(spec, xs[i])).abs().max().item() for i in range(32))
        print(f"mode {mode}: max |kernel - reference.hard| over 32 tokens {err:.2e}")
    calls, times, start = 400, {m: [] for m in modes}, 0
    with torch.no_grad():
        for _ in range(rounds):
            for mode in modes:
                ext._tune(mode, 2)
                t = time.perf_counter()
                for k in range(calls):
                    handle(xs[(start + k) % len(xs)])
                times[mode].append((time.perf_counter() - t) / calls * 1e6)
                start += calls
    ext._tune(1, 2)
    for mode in modes:
        p10 = statistics.quantiles(times[mode], n=10)[0]
        print(f"mode {mode}: median {statistics.median(times[mode]):.2f} us per call, p10 {p10:.2f} us")


if __name__ == "__main__":
    main()
