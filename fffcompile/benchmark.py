"""CPU benchmark: fffcompile against everything a user could run instead, in one process, same inputs.

Two shapes (issue 4):

- ``ufb``: UltraFastBERT 1x11: one neuron tree of depth 11 (4095 neurons, 12 used per token),
  d = 768, GELU, tie "gt"; dense layer 768-3072-768 (BERT-base feedforward).
- ``leaf``: form A, d = 768, depth 8, leaf width 16 (256 leaves); dense layer 768-4096-768.

Methods, all on the same weights and the same input rows:

- ``dense``: Linear -> activation -> Linear of the training width (the baseline of every ratio);
- ``soft``: the training graph (form B: the published UltraFastBERT training layer, every neuron
  times a 0/1 path mask, ``UltraFastBERTLayer``; form A: the ``fastfeedforward`` package's training
  forward, mixing all leaves);
- ``ff_eval``: the ``fastfeedforward`` package's own eval path (form A only);
- ``torch_hard``: the vectorised hard form in torch eager (``reference.hard``: one gather per level);
- ``torch_hard_compiled``: the same function through ``torch.compile`` (one compile per batch size);
- ``fffcompile``: ``fffcompile.optimize(model)`` of that layer (UltraFastBERT's own layer, or
  fastfeedforward's in eval mode): ``FusedFFF`` and its C++ kernel, as a user gets it.
- ``fffcompile_bf16``: ``fffcompile.optimize(model, weights="bf16")``: the same kernel on a bfloat16
  copy of the weights (x, sums, output float32); checked against ``reference.hard`` of the spec with
  its weights rounded to bfloat16, its error against the float32 hard form printed with the checks.

Timing: every call gets fresh rows (a pool of inputs larger than the caches is cycled), methods
are interleaved round by round, the figure is the median over rounds of the time per call (small
batches time several consecutive calls per round); the spread of the rounds is kept too: the 10th
and 90th percentiles (``spread`` in the JSON, ``+-N%`` = half the p10-p90 range over the median
in the table). Ratios are dense time / method time. Runs at 1 thread and at all threads. Results
print as a table and are written as JSON and a PNG plot.
A machine shared with other jobs gives noisy figures: compare runs on a quiet machine.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import reference
from .compare import compare, default_tolerance
from .spec import FFFSpec

BATCHES = (1, 128, 1024, 4096)
SHAPES = ("ufb", "leaf")
METHODS = ("dense", "soft", "ff_eval", "torch_hard", "torch_hard_compiled", "fffcompile", "fffcompile_bf16")
# issue 4's goals: ratio to dense at 1 thread
GOALS = {("ufb", 1): 150, ("ufb", 128): 35, ("ufb", 4096): 35, ("leaf", 1): 100, ("leaf", 1024): 30}


@dataclass
class Shape:
    name: str
    title: str
    spec: FFFSpec
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class UltraFastBERTLayer(nn.Module):
    """The published UltraFastBERT training layer, as its users write it: linear_in over every neuron,
    GELU, a 0/1 path mask built with gather/scatter under no_grad, linear_out (its forward is already
    the hard form; ``fffcompile bench``'s "soft" column and ``optimize()``'s input for the ufb shape)."""

    def __init__(self, width: int, depth: int, trees: int):
        super().__init__()
        self.width, self.depth, self.trees = width, depth, trees
        self.n_nodes = 2 ** (depth + 1) - 1
        self.linear_in = nn.Linear(width, trees * self.n_nodes)
        self.linear_out = nn.Linear(trees * self.n_nodes, width, bias=False)
        self.activation = nn.GELU()

    def forward(self, x):
        flat = x.reshape(-1, self.width)
        rows = flat.shape[0]
        logits = self.linear_in(flat)
        decisions = (logits > 0).long().view(rows, self.trees, self.n_nodes)
        activations = self.activation(logits).view(rows, self.trees, self.n_nodes)
        with torch.no_grad():
            current = torch.zeros((rows, self.trees), dtype=torch.long, device=x.device)
            mask = torch.zeros_like(activations)
            mask.scatter_(2, current.unsqueeze(-1), 1.0)
            for level in range(self.depth):
                moves = torch.gather(decisions, 2, current.unsqueeze(2)).squeeze(2)
                current = (current - (2 ** level - 1)) * 2 + moves + (2 ** (level + 1) - 1)
                mask.scatter_(2, current.unsqueeze(-1), 1.0)
        out = self.linear_out((activations * mask).flatten(1, 2))
        return out.reshape(*x.shape[:-1], self.width)

    def spec(self) -> FFFSpec:
        w_in, b_in = self.linear_in.weight.detach(), self.linear_in.bias.detach()
        w_out = self.linear_out.weight.detach().T.reshape(self.trees, self.n_nodes, self.width)
        return FFFSpec("neuron_tree", self.depth, "gelu", node_weight=w_in.reshape(self.trees, self.n_nodes, self.width),
                       node_bias=b_in.reshape(self.trees, self.n_nodes), out_weight=w_out.contiguous(),
                       out_bias=torch.zeros(self.width), tie="gt", source="hard")


def _dense(width: int, hidden: int, activation: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), activation, nn.Linear(hidden, width)).eval()


def _fused_of(model: nn.Module, example: torch.Tensor, spec: FFFSpec, notes: list[str],
              weights: Optional[str] = None) -> nn.Module:
    """optimize(model), or FusedFFF(spec) when optimize leaves the layer (said in the notes)."""
    from . import optimize
    from .runtime import FusedFFF
    try:
        optimized = optimize(model, example, weights=weights)
        if optimized.report.rewritten and any(isinstance(m, FusedFFF) for m in optimized.modules()):
            return optimized.eval()
        notes.append(f"optimize() left the layer ({optimized.report.left}); timed FusedFFF(spec)")
    except Exception as error:  # the benchmark still times the kernel, and says why
        notes.append(f"optimize() failed ({type(error).__name__}: {error}); timed FusedFFF(spec)")
    return FusedFFF(spec, weights=weights).eval()


def build_ufb(seed: int = 0) -> Shape:
    torch.manual_seed(seed)
    soft = UltraFastBERTLayer(768, 11, 1).eval()
    spec = soft.spec()
    shape = Shape("ufb", "UltraFastBERT 1x11 (d 768, depth 11, 12/4095 neurons) vs dense 768-3072-768", spec)
    shape.methods["dense"] = _dense(768, 3072, nn.GELU())
    shape.methods["soft"] = soft
    shape.methods["fffcompile"] = _fused_of(soft, torch.randn(8, 768), spec, shape.notes)
    shape.methods["fffcompile_bf16"] = _fused_of(soft, torch.randn(8, 768), spec, shape.notes, "bf16")
    return shape


def build_leaf(seed: int = 0) -> Optional[Shape]:
    try:
        import fastfeedforward
    except ImportError:
        return None
    torch.manual_seed(seed)
    ff = fastfeedforward.FFF(768, 16, 768, 8, activation=nn.ReLU())
    spec = FFFSpec("leaf_mlp", 8, "relu", node_weight=ff.node_weights.detach(), node_bias=ff.node_biases.detach().reshape(-1),
                   leaf_w1=ff.w1s.detach(), leaf_b1=ff.b1s.detach(), leaf_w2=ff.w2s.detach(), leaf_b2=ff.b2s.detach(),
                   tie="ge", source="soft")
    shape = Shape("leaf", "form A (d 768, depth 8, leaf width 16) vs dense 768-4096-768", spec)
    shape.methods["dense"] = _dense(768, 4096, nn.ReLU())
    train_copy = fastfeedforward.FFF(768, 16, 768, 8, activation=nn.ReLU())
    train_copy.load_state_dict(ff.state_dict())
    shape.methods["soft"] = train_copy.train()
    shape.methods["ff_eval"] = ff.eval()
    shape.methods["fffcompile"] = _fused_of(ff.eval(), torch.randn(8, 768), spec, shape.notes)
    shape.methods["fffcompile_bf16"] = _fused_of(ff.eval(), torch.randn(8, 768), spec, shape.notes, "bf16")
    ff.eval()
    return shape


def _add_torch_hard(shape: Shape, compiled: bool):
    spec = shape.spec
    hard = lambda x: reference.hard(spec, x)
    shape.methods["torch_hard"] = hard
    if compiled:
        shape.methods["torch_hard_compiled"] = torch.compile(hard, dynamic=False)


def _check(shape: Shape, x: torch.Tensor) -> str:
    """fffcompile's output equals the hard form's on the benchmark rows (near ties excluded); the bf16
    column equals the hard form of the bf16-rounded weights, and its error against the float32 hard
    form is measured (bf16 tolerances; rows whose path differs counted)."""
    with torch.no_grad():
        got = shape.methods["fffcompile"](x)
    expected = reference.hard(shape.spec, x)
    result = compare(got, expected, exclude=reference.near_ties(shape.spec, x))
    if not result:
        raise AssertionError(f"{shape.name}: fffcompile differs from the hard form: {result.summary()}")
    if "fffcompile_bf16" not in shape.methods:
        return result.summary()
    from .runtime.cpu_kernel import round_weight
    names = ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2", "out_weight", "out_bias")
    rounded = shape.spec.replace(**{n: round_weight(getattr(shape.spec, n), "bf16") for n in names
                                    if getattr(shape.spec, n) is not None})
    with torch.no_grad():
        got16 = shape.methods["fffcompile_bf16"](x)
    exact16 = compare(got16, reference.hard(rounded, x), exclude=reference.near_ties(rounded, x))
    if not exact16:
        raise AssertionError(f"{shape.name}: fffcompile_bf16 differs from the hard form of the bf16 weights: {exact16.summary()}")
    atol, rtol = default_tolerance(torch.bfloat16)
    vs32 = compare(got16, expected, atol=atol * max(1.0, float(expected.abs().max())), rtol=rtol)
    flips = int((reference.route(shape.spec, x).leaf != reference.route(rounded, x).leaf).any(-1).sum())
    return (f"{result.summary()}; bf16 column exact against the bf16-rounded hard form ({exact16.summary()}); "
            f"its error against the float32 hard form, measured, not checked: max abs {vs32.max_abs_error:.3g}, "
            f"max rel {vs32.max_rel_error:.3g}, {vs32.mismatched_rows}/{vs32.rows} rows beyond bf16 tolerance "
            f"(atol {vs32.atol:.3g}, rtol {vs32.rtol:g}), {flips} on another path")


# The fastfeedforward training forward materialises (batch, leaves, d_out): skipped above this many bytes.
MAX_SOFT_BYTES = 1 << 30


def skip_methods(shape: Shape, batch: int) -> dict[str, str]:
    """Methods left out at this batch, with the reason."""
    skip = {}
    if shape.spec.form == "leaf_mlp" and "soft" in shape.methods:
        need = batch * shape.spec.n_leaves * shape.spec.d_out * 4
        if need > MAX_SOFT_BYTES:
            skip["soft"] = f"the training forward would allocate {need / 2 ** 30:.1f} GiB at batch {batch}"
    return skip


def _time_round(fn, pool: list[torch.Tensor], start: int, calls: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(pool[(start + i) % len(pool)])
    return (time.perf_counter() - t0) / calls, start + calls


def spread(times: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles (linear interpolation between rounds) and the round count."""
    ts = sorted(times)
    if len(ts) == 1:
        return {"median": ts[0], "p10": ts[0], "p90": ts[0], "rounds": 1}
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return {"median": statistics.median(ts), "p10": q[0], "p90": q[-1], "rounds": len(ts)}


def measure(shape: Shape, batch: int, threads: int, rounds: int, budget_s: float, seed: int = 0) -> dict[str, dict]:
    """Seconds per call of every method on fresh rows, methods interleaved round by round:
    ``{method: spread(rounds)}`` (median, p10, p90, rounds)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed + batch)
    # enough distinct rows that repeated calls do not find their paths in cache (>= 256 rows, >= 2 batches)
    pool_size = max(2, -(-256 // batch))
    pool = [torch.randn(batch, shape.spec.d_in, generator=g) for _ in range(pool_size)]
    methods = {name: fn for name, fn in shape.methods.items() if name not in skip_methods(shape, batch)}
    times: dict[str, list[float]] = {name: [] for name in methods}
    cursor = {name: 0 for name in methods}
    calls = {}
    with torch.no_grad():
        for name, fn in methods.items():        # warm-up (and compile), and calls per round from one timing
            fn(pool[0])
            t, _ = _time_round(fn, pool, 0, 1)
            calls[name] = max(1, min(200, int(0.002 / max(t, 1e-9))))
        started = time.perf_counter()
        for r in range(rounds):
            for name, fn in methods.items():
                t, cursor[name] = _time_round(fn, pool, cursor[name], calls[name])
                times[name].append(t)
            if r >= 2 and time.perf_counter() - started > budget_s:
                break
    return {name: spread(ts) for name, ts in times.items()}


def run(shapes=SHAPES, batches=BATCHES, threads: Optional[list[int]] = None, rounds: int = 9, budget_s: float = 20.0,
        compiled: bool = True, log=print, methods: Optional[list[str]] = None) -> dict:
    """Run the benchmark; returns the JSON-ready results. methods: time only these (dense always)."""
    all_threads = threads or sorted({1, torch.get_num_threads()})
    initial_threads = torch.get_num_threads()
    from .runtime import cpu_kernel
    results = {"machine": machine_info(cpu_kernel), "rounds": rounds, "results": [], "notes": {}, "checks": {}}
    builders = {"ufb": build_ufb, "leaf": build_leaf}
    try:
        for name in shapes:
            shape = builders[name]()
            if shape is None:
                results["notes"][name] = ["skipped: the fastfeedforward package is not installed"]
                continue
            _add_torch_hard(shape, compiled)
            if methods:
                shape.methods = {k: v for k, v in shape.methods.items()
                                 if k in methods or k in ("dense", "fffcompile", "fffcompile_bf16")}
            results["notes"][name] = shape.notes
            results["checks"][name] = _check(shape, torch.randn(64, shape.spec.d_in))
            log(f"# {shape.title}: fffcompile vs hard form {results['checks'][name]}")
            for note in shape.notes:
                log(f"# note: {note}")
            log(header())
            for t in all_threads:
                for batch in batches:
                    for method, why in skip_methods(shape, batch).items():
                        note = f"{method} skipped: {why}"
                        if note not in shape.notes:
                            shape.notes.append(note)
                            log(f"# note: {note}")
                    row = make_row(name, batch, t, measure(shape, batch, t, rounds, budget_s))
                    results["results"].append(row)
                    log(format_row(row))
    finally:
        torch.set_num_threads(initial_threads)
    return results


def make_row(shape: str, batch: int, threads: int, stats: dict[str, dict]) -> dict:
    """One JSON result: ``seconds`` (medians), ``spread`` ({method: {p10, p90, rounds}}), ratios of medians."""
    medians = {k: v["median"] for k, v in stats.items()}
    return {"shape": shape, "batch": batch, "threads": threads, "seconds": medians,
            "spread": {k: {"p10": v["p10"], "p90": v["p90"], "rounds": v["rounds"]} for k, v in stats.items()},
            "ratio_to_dense": {k: medians["dense"] / v for k, v in medians.items()}}


def machine_info(cpu_kernel) -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "kernel_isa": cpu_kernel.isa(),
            "kernel_failure": cpu_kernel.failure(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


CELL = 29


def header() -> str:
    """Column titles; each cell is 'time per call +-spread  ratio to dense' (+ goal met, ! goal missed);
    the spread is half the p10-p90 range of the rounds, in percent of the median."""
    cols = "".join(f"{m:>{CELL}}" for m in METHODS)
    return f"{'shape':<6}{'batch':>6}{'thr':>4}{cols}"


def format_row(row: dict) -> str:
    cells = []
    for m in METHODS:
        if m not in row["seconds"]:
            cells.append(f"{'-':>{CELL}}")
            continue
        s, ratio = row["seconds"][m], row["ratio_to_dense"][m]
        goal = GOALS.get((row["shape"], row["batch"])) if m == "fffcompile" and row["threads"] == 1 else None
        mark = "" if goal is None else ("+" if ratio >= goal else "!")
        spread_pct = ""
        if "spread" in row and m in row["spread"] and s > 0:
            spread_pct = f"+-{50 * (row['spread'][m]['p90'] - row['spread'][m]['p10']) / s:.0f}%"
        cells.append(f"{_fmt_time(s):>10}{spread_pct:>7} {ratio:>8.1f}x{mark:1}")
    return f"{row['shape']:<6}{row['batch']:>6}{row['threads']:>4}" + "".join(f"{c:>{CELL}}" for c in cells)


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f}us" if s < 1e-3 else f"{s * 1e3:.2f}ms" if s < 1 else f"{s:.2f}s"


def write_json(results: dict, path: str):
    _atomic_write(path, json.dumps(results, indent=2).encode())


def write_plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({r["shape"] for r in results["results"]}, key=SHAPES.index)
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(7 * max(1, len(shapes)), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in results["results"] if r["shape"] == shape]
        for threads, style in zip(sorted({r["threads"] for r in rows}), ("-", "--", ":")):
            for method in METHODS:
                pts = [(r["batch"], r["ratio_to_dense"][method]) for r in rows if r["threads"] == threads and method in r["seconds"]]
                if method == "dense" or not pts:
                    continue
                ax.plot(*zip(*pts), style, marker="o", color=f"C{METHODS.index(method)}", label=f"{method} ({threads} thr)")
        for (s, b), goal in GOALS.items():
            if s == shape:
                ax.plot([b], [goal], "k*", markersize=10)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (rows)")
        ax.set_ylabel("speed-up over the dense layer (x)")
        ax.set_title(shape + ("  (* = issue 4 goal, 1 thread)" if any(s == shape for s, _ in GOALS) else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"fffcompile CPU benchmark: {results['machine']['cpu']} (kernel {results['machine']['kernel_isa']})", fontsize=10)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _atomic_write(path: str, data: bytes):
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
