"""Micro-timing of the C++ kernel alone (the prepared handle, no module, no dense layer): for iterating.

    PYTHONPATH=. python benchmarks/kernel_micro.py [--shapes ufb leaf] [--batches 1 128 1024 4096]
                                                  [--threads 1 2] [--rounds 7] [--paths] [--cpu-time]

Per point: the median (p10-p90) over rounds of the time per call, each call on fresh rows (a pool
larger than the caches is cycled); the (shape, batch, threads) points are interleaved round by
round, in a new random order each round, so that a load spike on the shared machine hits all of
them alike and none always runs on the caches its predecessor warmed. ``--paths`` also times
every point with the subtree-blocked path off and threads splitting the rows statically (the
kernel before it: "per-row"), interleaved with the defaults ("default"). ``--cpu-time`` measures
the calling thread's CPU time instead of wall time: on a machine shared with other jobs it is
much steadier, but it is only meaningful at one thread.
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fffcompile.runtime import cpu_kernel  # noqa: E402
from fffcompile.spec import FFFSpec  # noqa: E402


def ufb_spec(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d = 4095, 768
    return FFFSpec("neuron_tree", 11, "gelu", node_weight=torch.randn(1, n, d, generator=g) / d ** 0.5,
                   node_bias=torch.randn(1, n, generator=g) * 0.1, out_weight=torch.randn(1, n, d, generator=g) / 64,
                   out_bias=torch.zeros(d), tie="gt", source="hard")


def leaf_spec(seed=0):
    g = torch.Generator().manual_seed(seed)
    d, D, l = 768, 8, 16
    L = 2 ** D
    return FFFSpec("leaf_mlp", D, "relu", node_weight=torch.randn(L - 1, d, generator=g) / d ** 0.5,
                   node_bias=torch.randn(L - 1, generator=g) * 0.1, leaf_w1=torch.randn(L, d, l, generator=g) / d ** 0.5,
                   leaf_b1=torch.zeros(L, l), leaf_w2=torch.randn(L, l, d, generator=g) / 4, leaf_b2=torch.zeros(L, d),
                   tie="ge", source="hard")


def handle(spec):
    if spec.form == "leaf_mlp":
        return cpu_kernel.prepare("leaf_mlp", spec.node_weight, spec.node_bias, spec.leaf_w1, spec.leaf_b1,
                                  spec.leaf_w2, spec.leaf_b2, spec.activation, spec.tie)
    return cpu_kernel.prepare("neuron_tree", spec.node_weight, spec.node_bias, spec.out_weight, spec.out_bias,
                              None, None, spec.activation, spec.tie)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["ufb", "leaf"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 128, 1024, 4096])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--paths", action="store_true", help="also time the per-row path with static thread chunks")
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU time instead of wall time")
    args = ap.parse_args(argv)
    specs = {"ufb": ufb_spec, "leaf": leaf_spec}
    ext = cpu_kernel.load()
    defaults = ext._tune_grouped(0, 0, 1, 0, 0)
    ext._tune_grouped(*defaults)
    variants = {"default": defaults}
    if args.paths:
        variants["per-row"] = (1 << 62, 1 << 62, defaults[2], defaults[3], 0)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    points = []
    for name in args.shapes:
        spec = specs[name]()
        fn = handle(spec)
        for b in args.batches:
            g = torch.Generator().manual_seed(b)
            pool = [torch.randn(b, spec.d_in, generator=g) for _ in range(max(2, -(-2048 // b)))]
            for t in args.threads:
                for variant, knobs in variants.items():
                    points.append({"name": name, "batch": b, "threads": t, "fn": fn, "pool": pool, "i": 0, "times": [],
                                   "calls": 1, "variant": variant, "knobs": knobs})
    with torch.no_grad():
        for p in points:
            torch.set_num_threads(p["threads"])
            ext._tune_grouped(*p["knobs"])
            p["fn"](p["pool"][0])
            t0 = time.perf_counter()
            p["fn"](p["pool"][1])
            p["calls"] = max(1, min(100, int(0.01 / max(1e-9, time.perf_counter() - t0))))
        for rnd in range(args.rounds):
            # a new order every round: a point timed right after a point of the same shape finds its
            # weights warm, and a fixed order would hand that advantage to the same variant each time
            for p in random.Random(rnd).sample(points, len(points)):
                torch.set_num_threads(p["threads"])
                ext._tune_grouped(*p["knobs"])
                t0 = clock()
                for _ in range(p["calls"]):
                    p["fn"](p["pool"][p["i"] % len(p["pool"])])
                    p["i"] += 1
                p["times"].append((clock() - t0) / p["calls"])
    ext._tune_grouped(*defaults)
    print(f"load average {os.getloadavg()}; {'thread CPU time' if args.cpu_time else 'wall time'}")
    for p in points:
        ts = sorted(p["times"])
        q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
        med = statistics.median(ts)
        print(f"{p['name']:<5} b{p['batch']:<5} thr{p['threads']} {p['variant']:>8} {med * 1e6:9.1f} us  ({q[0] * 1e6:.1f}-{q[-1] * 1e6:.1f})"
              f"  {med / p['batch'] * 1e6:7.2f} us/row")


if __name__ == "__main__":
    main()
