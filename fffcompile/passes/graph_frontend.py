"""The graph frontend: find FFF soft (and neuron) trees in a captured graph, whoever wrote them.

Pipeline, one concept per module:
1. ``graph_capture``: torch.export (ATen, functionalised, dynamic dims), else torch.fx; a model no
   capture can follow as a whole has its submodules captured instead (``_rewrite_submodules``);
2. ``graph_canonical``: op vocabulary and per-node facts (value dependence, affine source),
   one linear pass;
3. ``graph_anchor``: decisions (sigmoid / log-sigmoid / comparisons of logits affine in an
   input x) grouped by x; post-dominating outputs that also read a leaf side;
4. ``graph_cutout``: the candidate x -> y as its own program (constants evaluated once);
5. ``graph_extract``: the FFFSpec read off by evaluating the cut-out on chosen rows
   (``graph_rowloop``: a descent unrolled over the example's rows is read as one row program);
6. ``graph_confirm``: the spec's reference against the hardened cut-out on probe rows;
7. ``graph_rewrite``: FusedFFF calls in a copy of the graph; the rest untouched.

What the module frontend already rewrote appears in the capture as the fused op and is not
anchored again. Nothing found: the model comes back as it was (not as a graph). Refusals reach
``report.left`` with the reason and the best near miss.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import time
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from ..report import Left, Report, Rewritten
from ..verify import fidelity_warning
from .graph_anchor import Candidate, find_candidates
from .graph_canonical import GraphFacts
from .graph_capture import CaptureFailed, capture
from .graph_confirm import GraphConfirmed, GraphRefused, confirm
from .graph_cutout import ConstantCache, Cutout, NotAFunctionOfX
from .graph_extract import extract_hard_leaf_mlp, extract_leaf_mlp, extract_neuron_tree
from .graph_rewrite import hardened_original, rewrite
from .graph_rowloop import row_program

HARDENED_ATTRIBUTE = "_fffcompile_graph_hardened"


def _record(gm: fx.GraphModule, inputs: tuple, kwargs: dict, nodes) -> dict:
    """The values the wanted nodes take in one run of the graph on the example inputs."""
    wanted, seen = set(nodes), {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                seen[n] = value.detach().clone()
            return value

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = pytree.arg_tree_leaves(*inputs, **kwargs)
    if len(flat) != len(placeholders):
        flat = list(inputs)
    with torch.no_grad():
        Recorder(gm).run(*flat)
    return seen


def analyse(gm: fx.GraphModule, inputs: tuple, kwargs: dict, seed: int = 0):
    """Every candidate of the graph with its outcome: (candidate, cutout, y, GraphConfirmed) or (candidate, GraphRefused)."""
    facts = GraphFacts(gm)
    constants = ConstantCache(facts)
    candidates = find_candidates(facts)
    if not candidates:
        return facts, []
    values = _record(gm, inputs, kwargs, [c.x for c in candidates])
    outcomes = []
    for cand in candidates:
        if not cand.fallback:
            outcomes.append(_decide(facts, constants, cand, values.get(cand.x), seed))
    # a fallback reading (every sigmoid on x a decision, graph_anchor) only where no first reading of x confirmed
    done = {o[0].x for o in outcomes if isinstance(o[3], GraphConfirmed)}
    for cand in candidates:
        if cand.fallback and cand.x not in done:
            outcome = _decide(facts, constants, cand, values.get(cand.x), seed)
            if isinstance(outcome[3], GraphConfirmed):
                outcomes = [o for o in outcomes if o[0].x is not cand.x or isinstance(o[3], GraphConfirmed)]
                outcomes.append(outcome)
    return facts, outcomes


def _decide(facts, constants, cand: Candidate, x_value, seed):
    if x_value is None or not isinstance(x_value, torch.Tensor) or not x_value.is_floating_point():
        return cand, None, None, GraphRefused("the candidate's input is not a floating-point tensor")
    if not cand.outputs:
        return cand, None, None, GraphRefused(
            f"{len(cand.decisions)} {cand.kind} decision(s) on one input, but no output that every decision "
            f"reaches and that mixes a leaf side computed from the input")
    d_in = x_value.shape[-1]
    x_rows = x_value.reshape(-1, d_in)
    best: Optional[GraphRefused] = None
    found = None
    outputs = list(cand.outputs)
    for k, y in enumerate(outputs):
        if found is not None and cand.kind == "soft":
            break
        try:
            cut = Cutout(facts, constants, cand.x, y)
        except NotAFunctionOfX as error:
            best = _better(best, GraphRefused(str(error)))
            if found is not None:
                break
            continue
        runner, judged = cut, cand        # what confirmation runs: the cut-out, or its per-row program
        try:
            if cand.kind == "soft":
                specs = extract_leaf_mlp(facts, cand, cut, d_in, seed)
                specs = [specs] if not isinstance(specs, str) else specs
            else:
                specs = extract_neuron_tree(facts, cand, cut, d_in, seed) if cand.sources else "no dense neuron logits"
                if isinstance(specs, str):
                    hard_a = extract_hard_leaf_mlp(facts, cand, cut, d_in, seed)
                    specs = [hard_a] if not isinstance(hard_a, str) else \
                        f"as a neuron tree: {specs}; as a descending form A tree: {hard_a}"
                if isinstance(specs, str):
                    looped = _per_row_loop(facts, cand, cut, d_in, seed)
                    if isinstance(looped, str):
                        specs = f"{specs}; as a per-row loop: {looped}"
                    else:
                        (runner, judged), specs = looped[:2], [looped[2]]
        except Exception as error:  # a third-party graph op the extractor cannot evaluate on probe rows
            specs = f"extraction failed at {y.name} ({type(error).__name__}: {error})"
        if isinstance(specs, str):
            best = _better(best, GraphRefused(specs, f"output {y.name}"))
            if found is not None:
                break
            continue
        for spec in _guarded(specs, y, refusals := []):
            outcome = confirm(judged, runner, spec, x_rows, seed)
            if isinstance(outcome, GraphConfirmed):
                if runner is not cut:
                    outcome = dataclasses.replace(outcome, per_row_loop=True)
                found = (cand, cut, y, outcome)
                break
            best = _better(best, outcome)
        else:
            for refusal in refusals:
                best = _better(best, refusal)
            if found is not None:
                break
    if found is not None:
        return _extend_through_views(facts, *found)
    return cand, None, None, best


def _drop_shape_guards(gm: fx.GraphModule) -> bool:
    """Remove torch.export's input-shape guard call (``_guards_fn``): the guards a rewritten
    per-row loop imposed (batch == the example's) would otherwise refuse every other batch.

    All of them go, not only the loop's: they are code over the input sizes, and the loop's
    specialisation leaks into every guard on the row dims (B * S == 6 makes S <= 3), including
    those of the model's own branches (S >= 3), so they cannot be told apart by their text; and
    exporting the rewritten graph again regenerates none of the branch guards (the branch is no
    longer in the graph). Regenerating them precisely needs the original model exported again
    with the loop's module swapped for the fused op."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn" and not n.users]
    for n in calls:
        gm.graph.erase_node(n)
    if calls:
        gm.recompile()
    return bool(calls)


def _per_row_loop(facts, cand: Candidate, cut: Cutout, d_in: int, seed: int):
    """A descending form A tree unrolled over the example's rows: (row program, candidate on row 0's
    decisions, spec) or the reason it is not one. All rows are read at once (row r's copies given
    row r's values); confirmation then runs every row's copy against the one spec."""
    program = row_program(cut)
    if isinstance(program, str):
        return program
    kept = set(program.nodes)
    row_cand = dataclasses.replace(cand, decisions=[d for d in cand.decisions if d in kept], outputs=[])
    spec = extract_hard_leaf_mlp(facts, row_cand, program, d_in, seed)
    if isinstance(spec, str):
        return spec
    return program, row_cand, spec


def _extend_through_views(facts, cand, cut, y, outcome):
    """Prefer a later output that only reshapes y (the layer's own final view) when it has x's row layout."""
    from .graph_canonical import MOVES, hint_shape
    x_shape = hint_shape(cand.x)
    while True:
        users = list(y.users)
        if len(users) != 1 or facts.name[users[0]] not in MOVES or hint_shape(y) is None:
            break
        nxt = users[0]
        shape = hint_shape(nxt)
        if shape is None or x_shape is None or shape != (*x_shape[:-1], outcome.spec.d_out):
            break
        try:
            cut = Cutout(facts, cut.constants, cand.x, nxt)
        except NotAFunctionOfX:
            break
        y = nxt
    return cand, cut, y, outcome


def _guarded(specs, y, refusals: list):
    """The specs of a (lazy) extraction; an exception while reading one becomes a refusal."""
    iterator = iter(specs)
    while True:
        try:
            spec = next(iterator)
        except StopIteration:
            return
        except Exception as error:  # a third-party graph op the extractor cannot evaluate on probe rows
            refusals.append(GraphRefused(f"extraction failed at {y.name} ({type(error).__name__}: {error})"))
            return
        yield spec


def _better(best, new):
    if best is None:
        return new
    if new.needed < best.needed:
        return new
    return best


def rewrite_graph(work: nn.Module, inputs: tuple, example_kwargs: Optional[dict], report: Report,
                  min_leaf_agreement: Optional[float] = None, seed: int = 0) -> nn.Module:
    """Capture ``work``, rewrite every confirmed FFF subgraph to the fused op; ``report`` gets the entries.

    Returns ``work`` itself when nothing is rewritten; else a module (the rewritten GraphModule, or
    ``work`` with rewritten submodules, see ``_rewrite_submodules``) carrying, as the plain attribute
    ``_fffcompile_graph_hardened``, a 1-tuple with the same model whose rewritten decisions are
    hardened (optimize()'s whole-model exactness oracle).
    """
    started = time.perf_counter()
    captured = capture(work, inputs, example_kwargs)
    if isinstance(captured, CaptureFailed):
        return _rewrite_submodules(work, inputs, example_kwargs, report, captured.reason, min_leaf_agreement,
                                   seed, started)
    done = _rewrite_captured(captured, inputs, example_kwargs, report, min_leaf_agreement, seed)
    if done is None:
        return work
    result, hardened, count = done
    object.__setattr__(result, HARDENED_ATTRIBUTE, (hardened,))
    report.notes.append(f"graph frontend: {count} rewrite(s) in {time.perf_counter() - started:.2f} s")
    return result


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused while one capture is analysed and rewritten: its full
    collections scan every fx object alive, so they made matching grow faster than the graph (depth-12
    unrolled form A, 49k nodes: 11.1 s -> 7.4 s, the rewrite's graph copy 4.4 s -> 0.9 s). Reference
    counting still frees what is not cyclic; the rest is collected when it resumes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_gc_paused()
def _rewrite_captured(captured, inputs: tuple, example_kwargs: Optional[dict], report: Report,
                      min_leaf_agreement: Optional[float], seed: int, prefix: str = ""):
    """(rewritten GraphModule, hardened GraphModule, count) for one capture, or None when nothing is rewritten."""
    gm = captured.module
    try:
        facts, outcomes = analyse(gm, inputs, example_kwargs or {}, seed)
    except Exception as error:   # never let the graph pass break a model the module frontend handled
        if os.environ.get("FFFCOMPILE_DEBUG"):
            raise
        report.notes.append(f"graph frontend: analysis failed{f' in {prefix}' if prefix else ''} "
                            f"({type(error).__name__}: {error}); the graph is left as "
                            f"it was (FFFCOMPILE_DEBUG=1 shows the traceback)")
        return None
    confirmed = []
    taken: set = set()
    looped = False          # a per-row loop among the rewritten: its shape guards go with it
    for cand, cut, y, outcome in outcomes:
        where = _prefixed(prefix, cand.where)
        if isinstance(outcome, GraphConfirmed) and taken.intersection(cut.nodes):
            outcome = GraphRefused("its subgraph overlaps another confirmed FFF's; only the first is rewritten")
        if not isinstance(outcome, GraphConfirmed):
            report.left.append(Left(where, f"graph: {outcome.reason}", outcome.near_miss, frontend="fx"))
            continue
        spec, fidelity = outcome.spec, outcome.fidelity
        if min_leaf_agreement is not None and fidelity.leaf_agreement < min_leaf_agreement:
            report.left.append(Left(where, f"leaf agreement with the soft form {fidelity.leaf_agreement:.1%} is below "
                                           f"min_leaf_agreement={min_leaf_agreement:.1%}; kept soft", frontend="fx"))
            continue
        confirmed.append((cand, cut, y, spec, where))
        looped = looped or outcome.per_row_loop
        taken.update(cut.nodes)
        report.rewritten.append(Rewritten(
            where=where, form=spec.form_letter, depth=spec.depth, trees=spec.trees, d_in=spec.d_in, d_out=spec.d_out,
            source=spec.source, frontend="fx", exactness=outcome.exactness, fidelity=fidelity,
            speedup_bound=spec.soft_macs() / spec.hard_macs(), description=spec.describe(),
            warning=fidelity_warning(fidelity),
            notes=(f"found by dataflow in the {captured.how} graph{f' of {prefix}' if prefix else ''} "
                   f"({len(cand.decisions)} {cand.kind} decision node(s), "
                   f"{cand.x.name} -> {y.name}); confirmed against the subgraph with hardened decisions",)))
    if not confirmed:
        return None
    result = rewrite(gm, confirmed)
    if looped and captured.how == "export (dynamic)":
        dropped = _drop_shape_guards(result)
        if dropped:
            report.notes.append("graph frontend: a per-row loop specialised the capture to the example's batch; its "
                                "shape guards are dropped with it (the rest of the graph is symbolic)")
    return result, hardened_original(gm, confirmed), len(confirmed)


def _prefixed(prefix: str, where: str) -> str:
    if not prefix:
        return where
    return prefix if where in ("", "(the model itself)") else f"{prefix}.{where}"


def _builtin_leaf(module: nn.Module) -> bool:
    """A torch.nn layer without children (Linear, LayerNorm, Embedding, Dropout...): never an FFF on its own."""
    return type(module).__module__.startswith("torch.nn.") and not any(True for _ in module.children())


def _batch_generic(captured) -> bool:
    """The capture serves other batch sizes: an fx trace, or an export whose tensor inputs keep their first dim symbolic."""
    from .graph_canonical import meta_val
    if captured.how == "fx.symbolic_trace":
        return True
    for n in captured.module.graph.nodes:
        val = meta_val(n) if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and not isinstance(val.shape[0], torch.SymInt):
            return False
    return True


def _rewrite_submodules(work: nn.Module, inputs: tuple, example_kwargs: Optional[dict], report: Report, reason: str,
                        min_leaf_agreement: Optional[float], seed: int, started: float) -> nn.Module:
    """The whole model cannot be captured (a cache object in its outputs, Python control flow): capture
    its submodules instead, outermost first, each as it was called in one forward on the example inputs.

    A submodule is taken when torch.export captures it with dynamic row dims (a static capture would
    refuse other batch sizes); otherwise its children are tried. Each captured submodule is searched
    and rewritten like a whole model and put back in its place; the hardened oracle is a copy of the
    model with those submodules' hardened graphs in their places. Built-in torch.nn leaf layers are skipped.
    """
    from .module_frontend import set_submodule
    from .record_inputs import record_calls
    modules = {name: m for name, m in work.named_modules() if name and not _builtin_leaf(m)}
    calls = record_calls(work, inputs, modules, example_kwargs)
    replaced = {}
    queue = [name for name, _ in work.named_children()]
    while queue:
        name = queue.pop(0)
        module = modules.get(name)
        if module is None:
            continue
        children = [f"{name}.{c}" for c, _ in module.named_children()]
        call = calls[name]
        if not call.args and not call.kwargs:
            queue = children + queue            # never called itself (a ModuleList): its children may be
            continue
        captured = capture(module, call.args[0], call.kwargs[0])
        if isinstance(captured, CaptureFailed) or not _batch_generic(captured):
            queue = children + queue
            continue
        done = _rewrite_captured(captured, call.args[0], call.kwargs[0], report, min_leaf_agreement, seed, prefix=name)
        if done is not None:
            replaced[name] = done
    if not replaced:
        report.notes.append(f"graph frontend: the model could not be captured ({reason})"
                            + ("; nor could any of its submodules with an FFF be rewritten" if modules else ""))
        return work
    hardened = copy.deepcopy(work)
    for name, (result, hardened_gm, _) in replaced.items():
        work = set_submodule(work, name, result)
        hardened = set_submodule(hardened, name, hardened_gm)
    object.__setattr__(work, HARDENED_ATTRIBUTE, (hardened,))
    report.notes.append(f"graph frontend: the whole model could not be captured ({reason.split(';')[0][:160]}); "
                        f"{sum(d[2] for d in replaced.values())} rewrite(s) in {len(replaced)} captured submodule(s) "
                        f"({', '.join(replaced)}) in {time.perf_counter() - started:.2f} s")
    return work
