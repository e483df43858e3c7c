"""optimize(model, example_inputs): a copy of the model whose FFF layers run the fused hard descent.

Pipeline (DESIGN.md): frontends find candidates by structure, extraction builds an FFFSpec,
confirmation by numbers decides, the rewrite swaps in the fused op, verify compares the whole
model with the original. The user's model is never mutated; a model with nothing to rewrite
comes back as an unchanged copy with the reason in ``.report``.

Frontends, in order:
1. module: submodules whose parameters fit an FFF signature, confirmed against their own
   forward with hardened decisions (works for layers no capture can see);
2. graph: the remaining model captured with torch.export and searched by dataflow
   (``fffcompile.passes.graph_frontend``, when present); when it rewrites, the result is the
   captured GraphModule and its exactness oracle is the same capture with the rewritten
   trees' decisions hardened.

Whole-model verify (``verify=True``): on the example inputs, the optimized model against
(a) the original with the rewritten layers hardened (exactness; a failure returns the model
unchanged, with the reason) and (b) the original as is (fidelity figures).

weights="bf16": the fused layers then run on a bfloat16 copy of their tree weights
(``reduced_weights``); verify adds the bf16 model against the hardened original, with tolerances
for bfloat16 weights, and each layer's decision flips on the example inputs (reported, not failed).
"""
from __future__ import annotations

import copy
import importlib.util
from typing import Optional, Sequence

import torch
from torch import nn

from . import reduced_weights
from .compare import compare, default_tolerance
from .errors import InvalidModelError, UserError
from .passes.confirm_module import run_original
from .passes.module_frontend import rewrite_modules, set_submodule
from .report import Left, Report

FRONTENDS = ("module", "graph")


class _HardenedOriginal(nn.Module):
    """The original layer run through the forward that confirmed it, with hardened sigmoids."""

    def __init__(self, module: nn.Module, training: bool, spec=None):
        super().__init__()
        self.module, self.training_forward, self.spec = module, training, spec

    def forward(self, x):
        return run_original(self.module, x, self.training_forward, harden=True, spec=self.spec)


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise UserError(f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        for v in value.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if hasattr(value, "logits"):
        return value.logits
    return None


def optimize(model: nn.Module, example_inputs, *, example_kwargs: Optional[dict] = None, verify: bool = True,
             min_leaf_agreement: Optional[float] = None, frontends: Sequence[str] = FRONTENDS,
             seed: int = 0, weights: Optional[str] = None) -> nn.Module:
    """Return a copy of ``model`` whose confirmed FFF layers run the fused op; its ``.report`` says what happened.

    example_inputs: a tensor or tuple of positional inputs (real data where possible: the fidelity
    figures are measured on it). min_leaf_agreement: keep soft any layer whose hard leaf agrees
    with the soft form's heaviest leaf for fewer rows than this. frontends: any of "module", "graph".
    weights: None (as trained) or "bf16" (the fused layers keep a bfloat16 copy of their tree weights;
    the report states its error against the hardened original).
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    unknown = set(frontends) - set(FRONTENDS)
    if unknown:
        raise UserError(f"unknown frontend(s) {sorted(unknown)}; choose from {FRONTENDS}")
    if weights not in reduced_weights.MODES:
        raise UserError(f"weights must be one of {reduced_weights.MODES}, got {weights!r}")
    inputs = _as_tuple(example_inputs)
    try:
        work = copy.deepcopy(model)
    except Exception as error:
        raise InvalidModelError(f"cannot copy the model to optimize it ({type(error).__name__}: {error}); "
                                f"optimize() never mutates the model it is given") from error
    try:
        with torch.no_grad():
            reference_out = model(*inputs, **(example_kwargs or {}))
    except Exception as error:
        raise InvalidModelError(f"the model fails on example_inputs ({type(error).__name__}: {error}); "
                                f"pass inputs the model accepts") from error
    report = Report()
    confirmations = {}
    if "module" in frontends:
        work, rewritten, left, confirmations = rewrite_modules(work, inputs, example_kwargs, min_leaf_agreement, seed)
        report.rewritten += rewritten
        report.left += left
    graph_hardened = None
    if "graph" in frontends and importlib.util.find_spec("fffcompile.passes.graph_frontend") is not None:
        from .passes import graph_frontend
        work = graph_frontend.rewrite_graph(work, inputs, example_kwargs, report,
                                            min_leaf_agreement=min_leaf_agreement, seed=seed)
        carried = work.__dict__.pop(graph_frontend.HARDENED_ATTRIBUTE, None)
        graph_hardened = carried[0] if carried else None
    # a place that one frontend rewrote is not "left": drop the other frontend's refusals and the
    # smaller candidates' near misses there
    rewritten_at = {r.where for r in report.rewritten}
    report.left = [entry for entry in report.left if entry.where not in rewritten_at]
    if verify and (confirmations or graph_hardened is not None):
        if graph_hardened is not None:
            # the captured graph (module rewrites, each confirmed on its own, already fused inside) with
            # the graph-rewritten trees' decisions hardened
            hardened = graph_hardened
        else:
            hardened = copy.deepcopy(model)
            for name, outcome in confirmations.items():
                original = hardened.get_submodule(name) if name else hardened
                hardened = set_submodule(hardened, name, _HardenedOriginal(original, outcome.forward != "eval forward",
                                                                                outcome.spec))
        with torch.no_grad():
            optimized_out = _first_tensor(work(*inputs, **(example_kwargs or {})))
            hardened_out = _first_tensor(hardened(*inputs, **(example_kwargs or {})))
        atol, rtol = default_tolerance(hardened_out.dtype)
        exact = compare(optimized_out, hardened_out, atol=atol * max(1.0, float(hardened_out.abs().max())), rtol=rtol)
        report.model_check = {"exactness vs the hardened original": exact,
                              "fidelity vs the original": compare(optimized_out, _first_tensor(reference_out))}
        if not exact:
            report.left += [Left(r.where, f"the whole-model check failed after rewriting ({exact.summary()}); "
                                          f"the model is returned unchanged") for r in report.rewritten]
            report.rewritten = []
            work = copy.deepcopy(model)
        elif weights is not None:
            report.notes += reduced_weights.apply(work, weights)
            outputs = {}

            def run_bf16():
                with torch.no_grad():
                    outputs["y"] = _first_tensor(work(*inputs, **(example_kwargs or {})))
            flips = reduced_weights.decision_flips(work, run_bf16)
            result, notes = reduced_weights.check(outputs["y"], hardened_out, flips)
            report.model_check[reduced_weights.CHECK_NAME] = result
            report.notes += notes
    elif weights is not None and report.rewritten:
        report.notes += reduced_weights.apply(work, weights)
        report.notes.append("bf16 weights: not verified (verify=False or no whole-model check)")
    if not report.rewritten and not report.left:
        report.notes.append("no FFF layer found: no submodule's tensors fit an FFF signature"
                            + (" and the graph pass found no FFF subgraph" if "graph" in frontends else ""))
    work.report = report
    return work
