"""Graph frontend timing by depth on the unrolled (fastfeedforward-style) soft form A graph.

For each depth: torch.export capture (torch's own cost), then the frontend's stages: per-node
facts, anchoring, cut-out + numeric extraction + confirmation, and the rewrite. Matching is
meant to be linear in the graph size. Noisy on a shared machine; one run per depth.

    PYTHONPATH=. python benchmarks/bench_graph_matching.py --depths 4 6 8 10 11 --d 8 --leaf-width 1 --cache /tmp/fffbench

``--cache DIR`` saves each depth's exported program (torch.export.save) and reloads it on the next
run (the capture column then times the load): capture is torch's cost and dominates (minutes at depth 10 and more), matching is ours.

Measured 2026-11-23 (2 shared cores, noisy; batch 16, d 8, leaf width 1; "match" = facts +
anchor + recording x + cut-out/extraction/confirmation; capture = export + functionalisation):

    depth   nodes   capture s   match s (before)   match s (now)
        8    3226        69          -                 0.5
       10   12474       304          2.3 (1 run)       2.0
       11   24778       877         64 / 11.5          3.4
       12   49370       925          -                11.1 before the GC pause, 7.4 with it

Depth 12, measured 2026-11-24 on a quiet machine from the cached capture (``--depths 8 10 12 --cache``):
depth 8 0.38 s, 10 1.42 s, 12 11.1 s (facts 0.21, anchor 0.25, extraction + confirmation 6.2, rewrite
4.4). From depth 10 to 12 (4x the nodes) the time grew 7.8x: Python's cyclic garbage collector,
whose full collections scan every fx object alive. The frontend now pauses it while it analyses and
rewrites a capture (graph_frontend._gc_paused): depth 12 7.4 s (extraction + confirmation 6.0,
rewrite 0.9). torch.export's capture, not ours, still dominates (925 s at depth 12).

Before: the soft leaves' output rows, their owners and b2 were read with one probe row per
hidden unit and per leaf (2 (C + 1) + L rows, each through the whole O(L) graph: quadratic in
the leaf count). Now three backward passes over d_out rows read them (graph_extract,
``_mixing_by_gradients``): linear. "64" is the previous session's figure, "11.5" main's code on
the same cached depth-11 graph in this session.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from graph_gallery import Unrolled  # noqa: E402
from specs import make_spec  # noqa: E402

from fffcompile.passes.graph_anchor import find_candidates  # noqa: E402
from fffcompile.passes.graph_canonical import GraphFacts  # noqa: E402
from fffcompile.passes.graph_capture import capture  # noqa: E402
from fffcompile.passes.graph_confirm import GraphConfirmed  # noqa: E402
from fffcompile.passes.graph_cutout import ConstantCache  # noqa: E402
from fffcompile.passes.graph_frontend import _decide, _gc_paused, _record  # noqa: E402
from fffcompile.passes.graph_rewrite import rewrite  # noqa: E402


def _captured(layer, x, depth, args):
    """The graph capture() would give, reloaded from --cache when an earlier run saved it."""
    if not args.cache:
        return capture(layer, (x,)).module
    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"unrolled_D{depth}_d{args.d}_w{args.leaf_width}_b{args.batch}.pt2")
    if not os.path.exists(path):
        dims = ({i: torch.export.Dim.AUTO for i in range(x.dim())},)
        program = torch.export.export(layer, (x,), strict=False, dynamic_shapes=dims).run_decompositions({})
        torch.export.save(program, path + ".part.pt2")
        os.replace(path + ".part.pt2", path)
        return program.module()
    return torch.export.load(path).module()     # loading is slow too: the capture column then times the load


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8, 10])
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--leaf-width", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cache", help="folder keeping each depth's exported program between runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'depth':>5} {'nodes':>7} {'capture s':>9} {'facts s':>8} {'anchor s':>8} {'extract+confirm s':>17} "
          f"{'rewrite s':>9} {'match total s':>13}  found")
    for depth in args.depths:
        spec = make_spec(depth=depth, d_in=args.d, d_out=args.d, leaf_width=args.leaf_width, seed=depth)
        layer = Unrolled(spec).eval()
        x = torch.randn(args.batch, args.d)
        t0 = time.perf_counter()
        gm = _captured(layer, x, depth, args)
        t1 = time.perf_counter()
        with _gc_paused():     # as the frontend runs these stages
            facts = GraphFacts(gm)
            t2 = time.perf_counter()
            cands = find_candidates(facts)
            t3 = time.perf_counter()
            values = _record(gm, (x,), {}, [c.x for c in cands])
            outcomes = [_decide(facts, ConstantCache(facts), c, values.get(c.x), 0) for c in cands]
            t4 = time.perf_counter()
            confirmed = [(c, cut, y, o.spec, c.where) for c, cut, y, o in outcomes if isinstance(o, GraphConfirmed)]
            if confirmed:
                rewrite(gm, confirmed)
            t5 = time.perf_counter()
        ok = bool(confirmed) and confirmed[0][3].same_as(spec.replace(source=confirmed[0][3].source), atol=2e-5, rtol=2e-4)
        print(f"{depth:>5} {len(facts.nodes):>7} {t1 - t0:>9.2f} {t2 - t1:>8.2f} {t3 - t2:>8.2f} {t4 - t3:>17.2f} "
              f"{t5 - t4:>9.2f} {t5 - t1:>13.2f}  {'exact spec' if ok else 'NOT FOUND'}")


if __name__ == "__main__":
    main()
