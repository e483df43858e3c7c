"""``fffcompile export IN.onnx --target {onnx,trt} -o OUT.onnx``: rewrite every confirmed FFF to one fused node.

Runs the ONNX frontend (``fffcompile.onnx.onnx_frontend.optimize_onnx``), verifies the result in
ONNX Runtime against the original with the rewritten FFFs' decisions hardened (unless
``--no-verify``; inputs generated or from ``--inputs data.npz``), then writes OUT atomically:
nothing is written when anything fails. A model with nothing to rewrite is copied through, and
the command says so (exit 0). The report goes to stdout, progress to stderr.

``--engine model.plan`` (with ``--target trt``): after the ONNX file is written, build a
TensorRT engine from it (``fffcompile.runtime.trt_engine.build_engine``). Where TensorRT or a GPU
is missing, a warning says exactly what is missing, the ONNX file is kept, and the exit code is 0.

Exit codes: 0 written, 1 verification failed, 2 bad input or usage.
"""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="rewrite the FFF layers of an ONNX model to fused fffcompile nodes",
                              description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("input", metavar="IN.onnx", help="the ONNX model (external data next to it is read)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="where to write the rewritten model")
    p.add_argument("--target", default="onnx", choices=("onnx", "trt"),
                   help="onnx: runs anywhere via the model-local function; trt: nodes also carry TensorRT plugin attributes")
    p.add_argument("--no-verify", action="store_true", help="skip the whole-model check in ONNX Runtime")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance of the check (scaled by the output's magnitude)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance of the check")
    p.add_argument("--inputs", metavar="data.npz", default=None, help="inputs for the check, keyed by the model's input names")
    p.add_argument("--engine", metavar="model.plan", default=None,
                   help="with --target trt: also build a TensorRT engine (skipped with a warning where TensorRT is missing)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def _progress(message: str) -> None:
    print(f"fffcompile export: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    from ..errors import MissingDependencyError, UserError
    from ..onnx.files import check_output_path, load_model, save_model_atomic
    from ..onnx.onnx_frontend import optimize_onnx

    check_output_path(args.output)
    if args.engine:
        if args.target != "trt":
            raise UserError("--engine needs --target trt (the engine binds the fffcompile TensorRT plugins)")
        check_output_path(args.engine)
    if args.inputs is not None and args.no_verify:
        raise UserError("--inputs is only used by the verification; drop --no-verify or --inputs")
    _progress(f"reading {args.input}")
    model = load_model(args.input)
    optimized, report = optimize_onnx(model, args.target, verify=not args.no_verify, inputs=args.inputs,
                                      atol=args.atol, rtol=args.rtol, progress=_progress)
    _progress(f"writing {args.output}")
    files = save_model_atomic(optimized, args.output, external_data=True if _has_external_data(model) else None)
    print(report.to_json() if args.json else report)
    if report.changed:
        print(f"wrote {', '.join(files)}")
    else:
        print(f"nothing to rewrite: the model was copied through unchanged to {', '.join(files)}")
    if args.engine:
        from ..runtime.trt_engine import build_engine
        _progress(f"building the TensorRT engine {args.engine}")
        try:
            built = build_engine(files[0], args.engine)
        except MissingDependencyError as error:
            print(f"fffcompile export: warning: no engine built, {error}; the ONNX file {files[0]} is written",
                  file=sys.stderr)
            return 0
        print(f"wrote the engine {built.path} ({built.layers} layers, {built.plugin_layers} fffcompile plugin layers)")
    return 0


def _has_external_data(model) -> bool:
    import onnx
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
