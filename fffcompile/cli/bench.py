"""``fffcompile bench``: the CPU benchmark (``fffcompile.benchmark``): table, JSON and PNG in one run.

    fffcompile bench [--quick] [--shapes ufb leaf] [--batches 1 128 1024 4096] [--threads 1 2]
                     [--rounds 9] [--no-compile] [--methods dense fffcompile fffcompile_bf16 ...]
                     [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import os

DEFAULT_JSON = "fffcompile-bench-cpu.json"
DEFAULT_PLOT = "fffcompile-bench-cpu.png"
# benchmark.METHODS (not imported here: the CLI starts without torch)
METHOD_CHOICES = ("dense", "soft", "ff_eval", "torch_hard", "torch_hard_compiled", "fffcompile", "fffcompile_bf16")


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="time fffcompile against dense, soft, fastfeedforward and torch hard forms on CPU",
                              description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a short run: batches 1 and 1024, 1 thread, 5 rounds, no torch.compile (unless given explicitly)")
    p.add_argument("--shapes", nargs="+", choices=("ufb", "leaf"), help="default: both")
    p.add_argument("--batches", nargs="+", type=int, help="default: 1 128 1024 4096")
    p.add_argument("--threads", nargs="+", type=int, help="default: 1 and all (torch.get_num_threads())")
    p.add_argument("--rounds", type=int, help="interleaved rounds per point (default 9, quick 5)")
    p.add_argument("--budget", type=float, help="seconds per point after 3 rounds (default 20, quick 4)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="leave out the torch.compile'd hard form (compiling takes a while)")
    p.add_argument("--compile", dest="compile", action="store_true", help="include it even with --quick")
    p.add_argument("--methods", nargs="+", choices=METHOD_CHOICES,
                   help="time only these methods (dense, fffcompile and fffcompile_bf16 are always timed: the "
                        "ratios' baseline and the checked columns); default: all")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--plot", default=DEFAULT_PLOT, help=f"PNG plot (default {DEFAULT_PLOT}); 'none' to skip")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import UserError
    if args.batches and any(b < 1 for b in args.batches):
        raise UserError("--batches must be positive")
    cores = os.cpu_count() or 1
    if args.threads and any(t < 1 or t > 4 * cores for t in args.threads):
        raise UserError(f"--threads must be between 1 and {4 * cores}")
    if args.rounds is not None and args.rounds < 1:
        raise UserError("--rounds must be at least 1")
    for path in (args.json, args.plot):
        if path and path != "none" and os.path.isdir(path):
            raise UserError(f"{path}: is a directory; give a file name")
    if args.plot != "none":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("the plot needs matplotlib (pip install 'fffcompile[bench]'), or pass --plot none")

    from .. import benchmark
    quick = args.quick
    results = benchmark.run(
        shapes=args.shapes or benchmark.SHAPES,
        batches=args.batches or ((1, 1024) if quick else benchmark.BATCHES),
        threads=args.threads or ([1] if quick else None),
        rounds=args.rounds or (5 if quick else 9),
        budget_s=args.budget or (4.0 if quick else 20.0),
        compiled=(args.compile if args.compile is not None else not quick) and (
            not args.methods or "torch_hard_compiled" in args.methods),
        methods=args.methods,
        log=lambda line: print(line, flush=True))
    benchmark.write_json(results, args.json)
    print(f"wrote {args.json}")
    if args.plot != "none":
        benchmark.write_plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0
