"""The ONNX frontend: find FFF layers in an ONNX model, confirm them by numbers, replace each by one node.

    model, report = optimize_onnx(onnx.load("model.onnx"), target="trt")

1. ``detect``: anchors (router sigmoids of one input X; a neuron tree's comparison with 0; the
   comparisons of a hard descent, ``extract_hard_leaf_tree``, or of one that gathers its node
   rows, ``extract_gathered_tree``);
2. ``region``: the closed subgraph X -> Y around each candidate, smallest first;
3. ``extract_leaf_tree`` / ``extract_neuron_tree`` / the hard extractors: the FFFSpec, weights read
   back by numbers (or, for gathered tables, read by structure and kept only where the numbers agree);
4. ``confirm``: the cut-out region (sigmoids hardened) against ``reference.hard`` on probes; a region that the
   legacy exporter bound to its traced rows (an unrolled row loop, a constant of the traced shape) is read and
   confirmed at that shape, N traced rows at a time (``traced_rows``), and its rewrite is batch-generic;
5. rewrite: the region's nodes that depend on X are removed (and the constants only they read),
   one ``fff_node(spec, X, Y)`` takes their place with Y's name, so every consumer and the rest
   of the graph are untouched; ``insert_fff_nodes`` adds the functions, imports and IR version.
   Form C: the first closed region over the routers is the tree alone; the master leaf and the
   blend s(k) stay as they are.
6. with ``verify``: the whole rewritten model against the original with the rewritten FFFs'
   sigmoids hardened (exactness) and against the soft original (fidelity), in ONNX Runtime on
   generated inputs or the user's; a failure raises ``VerificationError``. Where a rewritten region was bound to
   its traced rows, generated inputs give it those rows (the original is right nowhere else), and the report says so.

Every candidate not rewritten is reported with its reason (``Report.left``), and so is a hard descent
that gathers node weight rows before its dot product (``detect.row_gather_descents``). A float16 /
bfloat16 model is read through its float32 twin (``widen``, ``find_in_model``). A router's s(-z)
next to s(z) (log-sigmoid pairs of a log-space mixture) is hardened as 1 - [z >= 0] (``complements``).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import numpy as np
import onnx

from ..errors import InvalidModelError, VerificationError
from ..report import Left, Report, Rewritten
from ..spec import FFFSpec
from .attach import attach_functions, insert_fff_nodes, raise_opset
from .confirm import confirm
from .contract import attribute, check_target, is_fff_node, onnx_dtype
from .detect import Candidate, find_candidates, row_gather_descents, scaled_routers, split_by_outputs
from .extract_leaf_tree import NotExtracted, extract_leaf_tree
from .extract_hard_leaf_tree import extract_hard_leaf_tree
from .extract_gathered_tree import extract_gathered_tree
from .extract_neuron_tree import extract_neuron_tree
from .graph_index import GraphIndex
from .linear_chains import chain_ends, projected_tensors, static_tensors
from .mixture_guard import router_sigmoids, soft_routers_mixing
from .node import fff_node
from .region import Region, candidate_regions
from .traced_rows import TracedIndex, traced_indexes
from .widen import NARROW, float32_twin, has_narrow_floats


@dataclass
class Found:
    candidate: Candidate
    region: Region
    spec: FFFSpec
    comparison: object
    sigmoids: list[str]         # names of the router sigmoids (hardened to verify); [] for form B
    complements: tuple[str, ...] = ()   # sigmoids of -z for a router logit z (log-sigmoid pairs): 1 - p when hard
    traced: Optional[tuple[int, ...]] = None    # the leading dims the region only runs at (``traced_rows``)

    def ties(self) -> dict[str, str]:
        """{sigmoid name: tie rule} that hardens this FFF: [z >= 0] for a router, [-z > 0] = 1 - [z >= 0] for a complement."""
        flipped = {"ge": "gt", "gt": "ge"}[self.spec.tie]
        return {**{n: self.spec.tie for n in self.sigmoids}, **{n: flipped for n in self.complements}}


def _log(progress: Optional[Callable[[str], None]], message: str) -> None:
    if progress is not None:
        progress(message)


def _name_anchors(model: onnx.ModelProto) -> None:
    """Give unnamed Sigmoid nodes a name (hardening finds them by name); nothing else changes."""
    names = {n.name for n in model.graph.node}
    k = 0
    for node in model.graph.node:
        if node.op_type == "Sigmoid" and not node.name:
            while f"fffcompile_sigmoid_{k}" in names:
                k += 1
            node.name = f"fffcompile_sigmoid_{k}"
            names.add(node.name)


def _try_region(index: GraphIndex, candidate: Candidate, region: Region,
                previous: Optional[Found] = None) -> tuple[Optional[Found], list[str]]:
    """Extract and confirm; with ``previous`` (a confirmed region that ``region`` extends by layout ops
    only) its spec is confirmed on the larger region without extracting again. A region bound to the shape
    it was traced with (``traced_rows``) is then tried at that shape, N traced rows at a time."""
    found, reasons = _extract_and_confirm(index, candidate, region, previous)
    if found is not None or previous is not None or isinstance(index, TracedIndex):
        return found, reasons
    for traced in traced_indexes(index, region):
        found, _ = _extract_and_confirm(traced, candidate, region, None)
        if found is not None:
            found.traced = traced.lead
            return found, []
    return None, reasons


def _extract_and_confirm(index: GraphIndex, candidate: Candidate, region: Region,
                         previous: Optional[Found]) -> tuple[Optional[Found], list[str]]:
    reasons = []
    x_shape, y_shape = index.shape(region.x), index.shape(region.y)
    if x_shape is not None and y_shape is not None and len(x_shape) != len(y_shape):
        return None, [f"{region.y!r} has rank {len(y_shape)}, the input {region.x!r} rank {len(x_shape)}"]
    try:
        if previous is not None:
            specs, sigmoids = [previous.spec], previous.sigmoids
        elif candidate.form == "A":
            specs = extract_leaf_tree(index, region, candidate.anchors, candidate.logits)
            sigmoids = [index.nodes[i].name for i in candidate.anchors]
        elif candidate.form == "H":
            specs = extract_hard_leaf_tree(index, region, candidate.anchors, candidate.tie)
            sigmoids = []
        elif candidate.form == "G":
            specs = extract_gathered_tree(index, region, candidate.tie, tuple(candidate.anchors))
            sigmoids = []
        else:
            specs = extract_neuron_tree(index, region, candidate.anchors[0], candidate.tie)
            sigmoids = []
        for spec in specs:
            # the largest layout-only extension first (restoring the input's leading dims): one check, not two
            for target in _layout_extensions(index, region, candidate.form)[::-1] + [region]:
                found = Found(candidate, target, spec, None, sigmoids, complements(index, target, candidate))
                comparison, why = confirm(index, target, spec, found.ties())
                if not why:
                    found.comparison = comparison
                    return found, []
            reasons.append(why)
        if not reasons:     # the extractor read no spec at all: say so, not a smaller region's reason
            reasons.append(f"at {region.y!r}: no reading of its weights reproduces its output on probe rows")
    except (NotExtracted, InvalidModelError) as error:
        reasons.append(f"at {region.y!r}: {error}")
    except Exception as error:  # a probe that does not run: not this region
        reasons.append(f"at {region.y!r}: probing failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    return None, reasons


def complements(index: GraphIndex, region: Region, candidate: Candidate) -> tuple[str, ...]:
    """Sigmoid nodes of the region computing s(-z) = 1 - s(z) for a router logit z of the candidate (``Neg(z)``):
    a log-space mixture's log s(-z) next to log s(z). Hardened with the other tie rule, they are 1 - [z >= 0]."""
    if candidate.form != "A":
        return ()
    logits = {index.nodes[i].input[0] for i in candidate.anchors}
    out = []
    for i in sorted(region.nodes):
        node = index.nodes[i]
        if node.op_type != "Sigmoid" or i in candidate.anchors:
            continue
        neg = index.producer_node(node.input[0])
        if neg is not None and neg.op_type == "Neg" and neg.input[0] in logits:
            out.append(node.name)
    return tuple(out)


# What may follow a confirmed FFF inside a larger confirmed one: layout (restoring the input's leading
# dims) and, for a neuron tree whose masked activations were found first, its output projection.
_LAYOUT_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Gather", "Slice", "Concat",
               "Constant", "Cast")
_PROJECTION_OPS = ("MatMul", "Gemm", "Einsum", "Add")


def _layout_extensions(index: GraphIndex, region: Region, form: str, limit: int = 4) -> list[Region]:
    """Closed regions that continue ``region`` through a chain of single-reader layout ops, nearest first."""
    from .region import _first_closed, layout_ancestors
    out, current = [], region
    entries = [(a, None) for a in layout_ancestors(index, region.x)][::-1] + [(region.x, index.forward_from(region.x))]
    while len(out) < limit:
        readers = index.consumers.get(current.y, [])
        if len(readers) != 1 or current.y in index.graph_outputs:
            break
        node = index.nodes[readers[0]]
        if node.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity") or not node.output:
            break
        larger, _ = _first_closed(index, entries, node.output[0])
        if larger is None or not _extends(index, current, larger, form):
            break
        out.append(larger)
        current = larger
    return out


def _extends(index: GraphIndex, smaller: Region, larger: Region, form: str) -> bool:
    """Whether ``larger`` is ``smaller`` followed by layout ops (and, form B, an output projection) only."""
    if not smaller.x_nodes <= larger.nodes:
        return False
    allowed = _LAYOUT_OPS + (_PROJECTION_OPS if form == "B" else ())
    return all(index.nodes[i].op_type in allowed for i in larger.x_nodes - smaller.x_nodes)


def other_uses(index: GraphIndex, candidate: Candidate) -> set[str]:
    """Values computed from the candidate's input by something other than its decisions: outputs of the
    non-chain readers of X's projections that are not anchors (leaf activations; a neuron tree's activation)."""
    static = static_tensors(index)
    forward = index.forward_from(candidate.x)
    projected = projected_tensors(index, candidate.x, forward, static)
    anchors = set(candidate.anchors)
    uses = set()
    for t in chain_ends(index, projected, forward):
        for i in index.consumers.get(t, ()):
            node = index.nodes[i]
            if i in anchors or node.op_type in ("Shape", "Size") or i not in forward:
                continue
            if all(o in projected for o in node.output if o):
                continue
            uses.update(o for o in node.output if o)
    return uses


def _confirm(index: GraphIndex, candidate: Candidate, where: str, taken: set[int]) -> tuple[Optional[Found], list[str]]:
    """The largest confirmed region of ``candidate`` outside ``taken`` (or None), and the reasons of the refusals."""
    reasons = []
    result = None
    outputs = [index.nodes[i].output[0] for i in candidate.anchors]
    uses = other_uses(index, candidate) if candidate.form not in ("H", "G") else set()
    for region, why in candidate_regions(index, candidate.x, outputs, uses):
        if region is None:
            if result is None:
                reasons.append(why)
            continue
        if region.x_nodes & taken:
            reasons.append(f"{region.y!r} overlaps an FFF already found")
            continue
        if result is not None and region.y in {o for i in result.region.x_nodes for o in index.nodes[i].output}:
            continue        # already inside the confirmed region (a layout extension taken at once)
        if result is not None and not _extends(index, result.region, region, candidate.form):
            break
        if candidate.form == "A":
            mixing = soft_routers_mixing(index, candidate.x, candidate.anchors, region, candidate.leaf_sigmoids)
            if mixing:
                if os.environ.get("FFFCOMPILE_DEBUG"):
                    print(f"fffcompile onnx: {where} at {region.y!r}: {mixing}", file=sys.stderr)
                reasons.append(mixing)
                if result is not None:
                    break
                continue
        layout_only = result is not None and _extends(index, result.region, region, "A")
        attempt, why = _try_region(index, candidate, region, result if layout_only else None)
        if os.environ.get("FFFCOMPILE_DEBUG"):
            print(f"fffcompile onnx: {where} at {region.y!r}: {'confirmed' if attempt else why}", file=sys.stderr)
        if attempt is not None:
            result = attempt        # a larger confirmed region (an output projection, a reshape) wins
        elif result is not None:
            break
        else:
            reasons.extend(why)
    return result, reasons


def find_ffs(index: GraphIndex, progress=None) -> tuple[list[Found], list[Left]]:
    """Confirmed FFFs (disjoint regions) and the candidates left, with reasons.

    A soft candidate with sigmoids read as leaf activations (``detect.leaf_activation``) that is not
    confirmed is not reported: its group's all-decisions reading follows (``fallback``) and is.
    A soft candidate that is not confirmed as a whole is split where its sigmoids meet last
    (``detect.split_by_outputs``: two trees routing one input); when a part is confirmed, every part
    is reported on its own, otherwise the candidate as a whole."""
    found, left, taken = [], [], set()
    first_reading: dict[str, list[str]] = {}        # x -> reasons of a leaf-sigmoid reading not confirmed
    candidates = find_candidates(index)
    for candidate in candidates:
        where = candidate.where(index)
        if any(a in taken for a in candidate.anchors):
            continue
        result, reasons = _confirm(index, candidate, where, taken)
        attempts = [(candidate, where, result, reasons)]
        if result is None and candidate.form == "A":
            parts = []
            for part in split_by_outputs(index, candidate):
                part_where = part.where(index)
                part_result, part_reasons = _confirm(index, part, part_where, taken)
                if part_result is not None:
                    taken |= part_result.region.x_nodes
                parts.append((part, part_where, part_result, part_reasons))
            if any(r is not None for _, _, r, _ in parts):
                attempts = parts
            else:       # a part that holds soft routers of the rest: the most telling reason
                mixing = [r for _, _, _, rs in parts for r in rs if "part of a larger mixture" in r]
                if mixing:
                    attempts = [(candidate, where, None, reasons + mixing[:1])]
        for candidate, where, result, reasons in attempts:
            if result is None and candidate.leaf_sigmoids:
                first_reading[candidate.x] = reasons    # its fallback (all-decisions reading) is tried and reported next
                continue
            if result is None:
                reason = reasons[-1] if reasons else "no closed subgraph depends on all of its decisions"
                if candidate.fallback:          # the first reading's numbers are the nearer miss
                    reasons = first_reading.pop(candidate.x, []) + reasons
                nearest = next((r for r in reversed(reasons) if "differs from the extracted" in r), None)
                left.append(Left(where, reason, near_miss=nearest if nearest != reason else None, frontend="onnx"))
                continue
            _log(progress, f"found {result.spec.describe()} at {where}")
            found.append(result)
            taken |= result.region.x_nodes
    anchored = {i for c in candidates for i in c.anchors}
    for table, comparisons in row_gather_descents(index, anchored).items():
        node = index.nodes[comparisons[0]]
        left.append(Left(f"hard descent at {node.op_type} {node.name or node.output[0]!r}",
                         f"the node weight rows ({table!r}) are gathered per row before the dot product (an eval-mode "
                         f"export): not a hard-descent layout fffcompile reads (its training graph, exported in train mode, is)",
                         frontend="onnx"))
    for i, x in scaled_routers(index):
        if i in anchored:       # a signed-path router, tried as such (rewritten, or left with its own reason)
            continue
        node = index.nodes[i]
        left.append(Left(f"FFF on {x!r} (anchor Sigmoid {node.name or node.output[0]!r})",
                         "a sigmoid of a projection times a constant tensor (signed paths, a log-space mixture): "
                         "no soft-tree layout fffcompile reads", frontend="onnx"))
    return found, left


def find_in_model(model: onnx.ModelProto, index: GraphIndex, progress=None) -> tuple[list[Found], list[Left]]:
    """``find_ffs`` on ``model`` (indexed by ``index``); a model with float16 / bfloat16 tensors is read through its
    float32 twin (``widen``: same nodes, same names), confirmed to its own dtype's tolerance, and each spec cast
    back to its input's dtype (exact: the twin's weights are the model's)."""
    if not has_narrow_floats(model):
        return find_ffs(index, progress)
    from .contract import torch_dtype
    twin = GraphIndex(float32_twin(model))
    twin.narrow_dtypes = {name: torch_dtype(index.elem_type(name)) for name in index.types
                          if index.elem_type(name) in NARROW}
    found, left = find_ffs(twin, progress)
    for f in found:
        if f.region.x in twin.narrow_dtypes:
            f.spec = f.spec.to(twin.narrow_dtypes[f.region.x])
    return found, left


def rewrite(model: onnx.ModelProto, index: GraphIndex, found: list[Found], target: str) -> onnx.ModelProto:
    """``model`` with every found region replaced by its fffcompile node (in place; returned)."""
    graph = model.graph
    removed = set()
    for f in found:
        removed |= f.region.x_nodes
    # constant nodes of the regions go when nothing else reads them any more
    candidates = set().union(*(f.region.nodes - f.region.x_nodes for f in found)) if found else set()
    kept = set(range(len(index.nodes))) - removed
    changed = True
    while changed:
        changed = False
        read = {name for i in kept for name in index.inputs_of[i]} | index.graph_outputs
        for i in list(candidates):
            if i in kept and not any(o in read for o in index.nodes[i].output if o):
                kept.discard(i)
                candidates.discard(i)
                removed.add(i)
                changed = True
    removed_inputs = {name for i in removed for name in index.inputs_of[i]}
    names = {n.name for n in graph.node} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    fff_nodes, casts = [], []
    for k, f in enumerate(found):
        name = f"fff_{k}"
        while any(n.startswith(name) for n in names):
            name += "_"
        names.add(name)
        y, y_type = f.region.y, index.elem_type(f.region.y)
        if y_type and y_type != onnx_dtype(f.spec.dtype):     # (a 16-bit layer whose export ends in float32)
            y = f"{name}_out"
            casts.append(onnx.helper.make_node("Cast", [y], [f.region.y], to=y_type, name=f"{name}_cast"))
        fff_nodes.append(fff_node(f.spec, f.region.x, y, target=target, name=name))
    new_nodes = [index.nodes[i] for i in sorted(kept)] + casts
    del graph.node[:]
    graph.node.extend(new_nodes)
    read = {name for n in graph.node for name in _inputs(n)} | {o.name for o in graph.output}
    initializers = [t for t in graph.initializer if t.name in read or t.name not in removed_inputs]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    alive = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {f.region.y for f in found}
    infos = [v for v in graph.value_info if v.name in alive]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return insert_fff_nodes(model, fff_nodes, target)


def _inputs(node: onnx.NodeProto):
    from .graph_index import node_inputs
    return node_inputs(node)


def hardening_of(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str], list]:
    """For verifying a rewrite of ``model``: (a copy of model with its anchors named, {router sigmoid: tie},
    [(spec, input value)] for the near-tie checks) of every FFF the frontend confirms in it."""
    return verification_of(model)[:3]


def verification_of(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str], list, dict, list[str]]:
    """``hardening_of``, then what generated inputs need where an FFF is bound to its traced rows
    (``verify_models``' ``traced`` and ``bound_rows``), and the report's lines about it."""
    working = onnx.ModelProto()
    working.CopyFrom(model)
    working = _respell_softplus_routers(working)      # (router softplus read as log-sigmoids: hardenable)
    _name_anchors(working)
    index = GraphIndex(working)
    found, _ = find_in_model(working, index)
    return (working, {name: tie for f in found for name, tie in f.ties().items()},
            [(f.spec, f.region.x) for f in found], _bounds(index, found), _traced_notes(found, "verified there"))


def _traced_notes(found: list[Found], how: str) -> list[str]:
    return [f"the original runs only at its traced shape {tuple(f.traced) + (f.spec.d_in,)} (at {f.region.x!r}): "
            f"{how}; the rewritten node is batch-generic" for f in found if f.traced is not None]


def _respell_softplus_routers(model: onnx.ModelProto, progress=None) -> onnx.ModelProto:
    """``model`` with its router softplus written as log-sigmoids (``softplus_routers``) when every one of them then
    lies inside a confirmed FFF; otherwise ``model`` itself (nothing outside an FFF is ever respelled)."""
    from .softplus_routers import softplus_as_log_sigmoid
    respelled, outputs = softplus_as_log_sigmoid(model)
    if not outputs:
        return model
    _name_anchors(respelled)
    index = GraphIndex(respelled)
    found, _ = find_in_model(respelled, index)
    inside = {o for f in found for i in f.region.x_nodes for o in index.nodes[i].output}
    if found and outputs <= inside:
        _log(progress, f"read {len(outputs) // 3} softplus router(s) as log-sigmoids")
        return respelled
    return model


def optimize_onnx(model: onnx.ModelProto, target: str = "onnx", *, verify: bool = True,
                  inputs: Union[None, str, Mapping[str, np.ndarray]] = None, atol: Optional[float] = None,
                  rtol: Optional[float] = None, progress: Optional[Callable[[str], None]] = None
                  ) -> tuple[onnx.ModelProto, Report]:
    """The model with every confirmed FFF replaced by one fffcompile node, and the report (see module doc).

    ``model`` is not modified. Nothing found: a copy of ``model`` and a report that says so.
    """
    check_target(target)
    start = time.perf_counter()
    working = onnx.ModelProto()
    working.CopyFrom(model)
    working = raise_opset(working)
    working = _respell_softplus_routers(working, progress)
    _name_anchors(working)
    original = onnx.ModelProto()
    original.CopyFrom(working)
    _log(progress, f"analysing {len(working.graph.node)} nodes")
    index = GraphIndex(working)
    found, left = find_in_model(working, index, progress)
    report = Report(left=left)
    if not found:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        stale = [n for n in copy.graph.node if is_fff_node(n) and
                 (attribute(n, "plugin_namespace") is not None) != (target == "trt")]
        if not stale:
            report.notes.append("no FFF layer was found to rewrite; the model is unchanged")
            return copy, report
        report.retargeted = sum(is_fff_node(n) for n in copy.graph.node)     # an earlier export, for another target
        report.notes.append(f"no new FFF layer to rewrite; the model's {report.retargeted} fffcompile node(s) now "
                            f"target {target!r} (plugin attributes {'set' if target == 'trt' else 'removed'})")
        return attach_functions(copy, target), report
    _log(progress, f"rewriting {len(found)} FFF layer(s)")
    optimized = rewrite(working, index, found, target)
    try:
        onnx.checker.check_model(optimized)
    except onnx.checker.ValidationError as error:
        raise InvalidModelError(f"the rewritten model does not pass onnx.checker: {str(error).splitlines()[0]}") from error
    for f in found:
        spec = f.spec
        report.rewritten.append(Rewritten(
            where=f.candidate.where(index), form=spec.form_letter, depth=spec.depth, trees=spec.trees, d_in=spec.d_in,
            d_out=spec.d_out, source=spec.source, frontend="onnx", exactness=f.comparison, fidelity=None,
            speedup_bound=spec.soft_macs() / max(1, spec.hard_macs()), description=spec.describe(),
            notes=(f"replaced {len(f.region.x_nodes)} nodes from {f.region.x!r} to {f.region.y!r}",)))
    removed = set().union(*(f.region.x_nodes for f in found))
    for x in dict.fromkeys(f.candidate.x for f in found):
        soft = [i for i in router_sigmoids(index, x) if i not in removed]
        if soft:       # not hardened by the exactness check below: say so (a gate, a look-alike's sigmoid)
            names = ", ".join(repr(index.nodes[i].name or index.nodes[i].output[0]) for i in soft[:6])
            report.notes.append(f"{len(soft)} sigmoid(s) of a projection of {x!r} stay soft outside the rewritten "
                                f"FFF(s) ({names}); the exactness check hardens only the rewritten routers")
    if verify:
        _log(progress, "verifying the rewritten model in ONNX Runtime")
        from .verify import verify_models
        ties = {name: tie for f in found for name, tie in f.ties().items()}
        checks = [(f.spec, f.region.x) for f in found]
        try:
            result = verify_models(original, optimized, sigmoids=ties, inputs=inputs, tie_checks=checks, atol=atol,
                                   rtol=rtol, **_bounds(index, found))
        except InvalidModelError as error:
            if inputs is not None:
                raise
            if "cannot load" in str(error):
                raise InvalidModelError(f"{error}; the whole-model check needs ONNX Runtime to run the original: "
                                        f"skip it with --no-verify (each rewritten FFF was confirmed on its own)") \
                    from error
            raise InvalidModelError(f"{error}; the check ran on generated inputs: pass real "
                                    f"inputs (--inputs data.npz) or skip the check (--no-verify)") from error
        if inputs is None and not any(f.traced for f in found) and _off_default(original, result.inputs):
            report.notes.append(f"the original does not run with its symbolic dims at 3: verified at input shapes "
                                f"{result.inputs} (the rest of the model is bound to those sizes)")
        report.model_check = {f"exactness {k}": c for k, c in result.exactness.items()}
        report.model_check.update({f"fidelity {k}": c for k, c in (result.fidelity or {}).items()})
        if not result.passed:
            failed = "; ".join(f"output {k}: {c.summary()}" for k, c in result.exactness.items() if not c.passed)
            raise VerificationError(f"the rewritten model differs from the original with hardened decisions ({failed})",
                                    next(iter(result.exactness.values()), None))
    report.notes += _traced_notes(found, ("verified there" if inputs is None else "verified on the given inputs")
                                  if verify else "its FFF was confirmed there (the whole-model check was skipped)")
    report.notes.append(f"ONNX frontend: {time.perf_counter() - start:.2f} s")
    return optimized, report


def _off_default(model: onnx.ModelProto, shapes: Mapping[str, tuple]) -> bool:
    """Whether a symbolic input dim took a size other than 3 in ``shapes`` (the verification's input shapes)."""
    for value in model.graph.input:
        for d, n in zip(value.type.tensor_type.shape.dim, shapes.get(value.name, ())):
            if not d.HasField("dim_value") and n != 3:
                return True
    return False


def _bounds(index: GraphIndex, found: list[Found]) -> dict:
    """``verify_models``' ``traced`` and ``bound_rows`` for the rewritten regions bound to their traced shape
    (``traced_rows``): {symbolic dim: size} of their inputs' leading dims, as shape inference names the dims (a graph
    input's own names where X is one), and {their input: its traced rows}."""
    dims = {}
    for f in found:
        shape = index.shape(f.region.x) or []
        if f.traced is not None and len(shape) == len(f.traced) + 1:
            dims.update({d: n for d, n in zip(shape, f.traced) if isinstance(d, str)})
    return {"traced": [dims] if dims else [], "bound_rows": {f.region.x: math.prod(f.traced) for f in found if f.traced}}
