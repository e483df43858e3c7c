"""ONNX Runtime benchmark: the rewritten file against the original soft file and the dense layer's file.

UltraFastBERT 1x11 shape by default (one neuron tree of depth 11: 4095 neurons, 12 used per
token; d = 768; GELU; tie "gt"). Three files, built here in the same run:

- soft: an UltraFastBERT-style layer (linear_in over every neuron, GELU, a 0/1 path mask built
  with gather/scatter under no_grad, linear_out) exported by torch's dynamo exporter;
- dense: Linear(768, 4095) -> GELU -> Linear(4095, 768), the feedforward layer of the same
  training width, exported the same way;
- fffcompile: one NeuronTree node (``fff_node``) holding the soft layer's weights, with its
  standard-op function body; with ``--frontend``, the soft file rewritten by the ONNX frontend
  (``optimize_onnx``, what ``fffcompile export`` runs), which must find the tree by itself.

The fffcompile file must equal the soft file (form B's training graph is already hard); the run
stops otherwise. Each file runs in ONNX Runtime (CPU, ``--threads`` intra-op threads, 1 by
default, sequential execution) on the same inputs, interleaved, ``--rounds`` rounds; the table
reports the median round's time per call (the machine is shared and noisy: the median of interleaved
rounds, not the best) and the ratios soft/fffcompile and dense/fffcompile.

With ``--overhead``, where batch 1 goes: the fffcompile file's node count after ONNX Runtime's own
optimizations, and, in the same interleaved rounds at batch 1, an empty one-node (Identity) model and
chains of 20 and 60 Relu nodes; the per-node cost is the slope between the two chains.

    python benchmarks/bench_onnx.py [--batches 1 128 4096] [--threads 1] [--rounds 15] [--frontend] [--overhead]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fffcompile.benchmark import UltraFastBERTLayer  # noqa: E402
from fffcompile.onnx import fff_node, insert_fff_nodes  # noqa: E402
from fffcompile.spec import FFFSpec  # noqa: E402


def dense_layer(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


def export_torch(module: nn.Module, width: int, path: str) -> str:
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.randn(2, width),), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return path


def rewritten_file(spec: FFFSpec, path: str) -> str:
    graph = helper.make_graph([], "fffcompile", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", spec.d_in])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", spec.d_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(insert_fff_nodes(model, [fff_node(spec, "x", "y", name="fff")]), path)
    return path


def frontend_file(soft_path: str, path: str) -> str:
    """The soft file rewritten by the ONNX frontend (detection, extraction, confirmation; no whole-model check)."""
    from fffcompile.onnx.onnx_frontend import optimize_onnx
    start = time.perf_counter()
    model, report = optimize_onnx(onnx.load(soft_path), "onnx", verify=False)
    if len(report.rewritten) != 1:
        raise SystemExit(f"the ONNX frontend did not find the tree in the soft file:\n{report}")
    print(f"ONNX frontend: {report.rewritten[0].description} in {time.perf_counter() - start:.1f} s")
    onnx.save(model, path)
    return path


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def relu_chain(width: int, nodes: int, path: str) -> str:
    """A model of ``nodes`` Relu nodes in a row on a (batch, width) input (an Identity for 0)."""
    names = ["x"] + [f"r{k}" for k in range(nodes - 1)] + ["y"]
    ops = [helper.make_node("Relu", [a], [b]) for a, b in zip(names, names[1:])] if nodes else \
        [helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(ops, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def runtime_nodes(path: str, workdir: str) -> int:
    """The nodes ONNX Runtime runs for ``path`` (functions inlined, constants folded, its own fusions)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = os.path.join(workdir, "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def time_call(s: ort.InferenceSession, feed: dict, budget: float) -> float:
    """Seconds per call: as many calls as fit in ``budget`` seconds (at least 1), after one warm-up call."""
    s.run(None, feed)
    calls, start = 0, time.perf_counter()
    while True:
        s.run(None, feed)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            return elapsed / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=11)
    parser.add_argument("--trees", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128, 4096])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds of calls per file, batch and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frontend", action="store_true",
                        help="build the fffcompile file with the ONNX frontend from the soft file (as fffcompile export does)")
    parser.add_argument("--overhead", action="store_true",
                        help="also measure where batch 1 goes: the file's node count in ONNX Runtime, an empty model's "
                             "call and the cost of a node (chains of 20 and 60 Relu nodes)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    soft = UltraFastBERTLayer(args.width, args.depth, args.trees)
    hidden = args.trees * soft.n_nodes
    with tempfile.TemporaryDirectory() as workdir:
        files = {"soft": export_torch(soft, args.width, os.path.join(workdir, "soft.onnx")),
                 "dense": export_torch(dense_layer(args.width, hidden), args.width, os.path.join(workdir, "dense.onnx"))}
        target = os.path.join(workdir, "fffcompile.onnx")
        files = {"fffcompile": frontend_file(files["soft"], target) if args.frontend else rewritten_file(soft.spec(), target),
                 **files}
        sessions = {name: session(path, args.threads) for name, path in files.items()}
        if args.overhead:
            nodes = runtime_nodes(target, workdir)
            chains = {n: session(relu_chain(args.width, n, os.path.join(workdir, f"chain{n}.onnx")), args.threads)
                      for n in (0, 20, 60)}

    rng = np.random.default_rng(args.seed)
    check = {"x": rng.standard_normal((256, args.width)).astype(np.float32)}
    ours, theirs = sessions["fffcompile"].run(None, check)[0], sessions["soft"].run(None, check)[0]
    error = float(np.abs(ours - theirs).max() / max(1.0, np.abs(theirs).max()))
    if not error < 1e-4:
        print(f"the fffcompile file differs from the soft file (max rel. error {error:.3g}); not benchmarking")
        return 1

    print(f"ONNX Runtime {ort.__version__}, {args.threads} thread(s); {args.trees}x{args.depth} neuron tree, "
          f"width {args.width}, {hidden} neurons ({args.trees * (args.depth + 1)} used per row); "
          f"fffcompile == soft to {error:.1e}; median of {args.rounds} interleaved rounds")
    print(f"{'batch':>6} {'fffcompile':>12} {'soft':>12} {'dense':>12} {'soft/fff':>9} {'dense/fff':>10}")
    for batch in args.batches:
        feed = {"x": rng.standard_normal((batch, args.width)).astype(np.float32)}
        times = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, s in sessions.items():
                times[name].append(time_call(s, feed, args.budget))
        f, s_, d = (statistics.median(times[name]) for name in ("fffcompile", "soft", "dense"))
        print(f"{batch:>6} {f * 1e6:>10.1f}us {s_ * 1e6:>10.1f}us {d * 1e6:>10.1f}us {s_ / f:>8.1f}x {d / f:>9.1f}x",
              flush=True)
    if args.overhead:
        feed = {"x": rng.standard_normal((1, args.width)).astype(np.float32)}
        times = {n: [] for n in chains}
        for _ in range(args.rounds):
            for n, s in chains.items():
                times[n].append(time_call(s, feed, args.budget))
        t = {n: statistics.median(v) for n, v in times.items()}
        print(f"batch 1, where it goes: the fffcompile file runs {nodes} nodes in ONNX Runtime; an empty model "
              f"(one Identity) {t[0] * 1e6:.1f}us a call; a Relu node {(t[60] - t[20]) / 40 * 1e6:.2f}us "
              f"(chains of 20 and 60: {t[20] * 1e6:.1f}us, {t[60] * 1e6:.1f}us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
