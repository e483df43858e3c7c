"""``fffcompile verify ORIGINAL.onnx OPTIMIZED.onnx [--inputs data.npz]``: check a rewrite in ONNX Runtime.

The FFFs of ORIGINAL are found again (detection and confirmation, as ``export`` does) so that
their router sigmoids can be hardened; OPTIMIZED must match that hardened original to float
tolerance (exactness) and is compared with the soft original (fidelity, reported only).
Exit codes: 0 exact, 1 not exact, 2 bad input.
"""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="compare an optimized ONNX model with its original in ONNX Runtime",
                              description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("original", metavar="ORIGINAL.onnx")
    p.add_argument("optimized", metavar="OPTIMIZED.onnx")
    p.add_argument("--inputs", metavar="data.npz", default=None, help="inputs keyed by the model's input names")
    p.add_argument("--atol", type=float, default=None)
    p.add_argument("--rtol", type=float, default=None)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..onnx.files import load_model
    from ..onnx.onnx_frontend import verification_of
    from ..onnx.verify import verify_models

    original = load_model(args.original)
    optimized = load_model(args.optimized)
    print("fffcompile verify: finding the FFFs of the original", file=sys.stderr, flush=True)
    named, sigmoids, tie_checks, bounds, notes = verification_of(original)
    result = verify_models(named, optimized, sigmoids=sigmoids, inputs=args.inputs, tie_checks=tie_checks,
                           atol=args.atol, rtol=args.rtol, **bounds)
    print(result.summary())
    for note in notes if args.inputs is None else ():
        print(f"note: {note}")
    if not result.passed:
        print("fffcompile verify: FAIL: the optimized model differs from the original with hardened decisions",
              file=sys.stderr)
        return 1
    print("PASS")
    return 0
