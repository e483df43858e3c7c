"""``fffcompile inspect IN.onnx [--json]``: what the ONNX frontend would rewrite, what not, and why.

Detection, extraction and confirmation by numbers run as in ``export``; nothing is written.
Exit codes: 0 (whatever was found), 2 bad input.
"""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="list the FFF layers an ONNX model holds and what export would do",
                              description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..onnx.files import load_model
    from ..onnx.onnx_frontend import optimize_onnx

    model = load_model(args.input)
    _, report = optimize_onnx(model, "onnx", verify=False,
                              progress=lambda m: print(f"fffcompile inspect: {m}", file=sys.stderr, flush=True))
    if args.json:
        print(report.to_json())
    else:
        print(f"{args.input}: {len(model.graph.node)} nodes")
        print(str(report).replace("rewritten:", "would rewrite:", 1).replace(
            "rewritten: nothing (the model is returned unchanged)", "would rewrite: nothing"))
    return 0
