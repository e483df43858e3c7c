"""The module frontend: replace confirmed FFF submodules of a model with ``FusedFFF``.

1. candidates: submodules whose tensors fit an FFF signature (``module_signatures.looks_like_fff``),
   innermost first;
2. one forward of the model on the example inputs records what each candidate receives;
3. each candidate called as module(x) is confirmed by numbers (``confirm_module.confirm``); its
   outcome, rewrite or refusal, settles its ancestors too (a block holding a tree is not another
   tree). A candidate never called as module(x) (a ModuleList of routers, say) leaves the
   question to the enclosing candidate;
4. confirmed ones are swapped, in the copy of the model that optimize() works on, for a
   ``FusedFFF`` of their spec; the rest are reported with their reason.

This is the way in for layers that no graph capture can see (the fastfeedforward package's
FFF as shipped: its int64 ``depth`` Parameter defeats torch.export and fx) and the first pass
for all others. It never rewrites on a name: only shapes propose and only numbers decide.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..report import Left, Rewritten
from ..runtime.fused_module import FusedFFF
from ..verify import fidelity_warning
from .confirm_module import Confirmed, confirm
from .module_signatures import looks_like_fff
from .record_inputs import record_calls


def find_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Submodules (by qualified name, innermost first) whose tensors fit an FFF signature."""
    return {name: module for name, module in _post_order(model, "")
            if not isinstance(module, FusedFFF) and looks_like_fff(module)}


def _post_order(module: nn.Module, name: str):
    for child_name, child in module.named_children():
        yield from _post_order(child, f"{name}.{child_name}" if name else child_name)
    yield name, module


def _inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def set_submodule(model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
    if not name:
        return replacement
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, replacement)
    return model


def rewrite_modules(model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict] = None,
                    min_leaf_agreement: Optional[float] = None, seed: int = 0):
    """Rewrite ``model`` in place; returns (model, rewritten entries, left entries, confirmations by name)."""
    candidates = find_candidates(model)
    rewritten, left, confirmations = [], [], {}
    if not candidates:
        return model, rewritten, left, confirmations
    calls = record_calls(model, example_inputs, candidates, example_kwargs)
    settled: list[str] = []     # candidates whose outcome covers their ancestors too
    unreached: dict[str, Left] = {}
    for name, module in candidates.items():
        if any(_inside(done, name) for done in settled):
            continue        # an FFF below was decided (a block holding a rewritten or refused tree)
        where = name or "(the model itself)"
        if not calls[name].single_tensor_calls:
            # not called as module(x): the tree may be assembled by an enclosing module; let it try
            why = ("it fits an FFF by shape but the example inputs never reach it" if not calls[name].args else
                   "it is called with arguments other than one tensor (or returns more than one); "
                   "the fused module takes x alone")
            unreached[name] = Left(where, why)
            continue
        settled.append(name)
        outcome = confirm(module, calls[name], seed=seed)
        if not isinstance(outcome, Confirmed):
            left.append(Left(where, outcome.reason, outcome.near_miss))
            continue
        spec, fidelity = outcome.spec, outcome.fidelity
        if min_leaf_agreement is not None and fidelity.leaf_agreement < min_leaf_agreement:
            left.append(Left(where, f"leaf agreement with the soft form {fidelity.leaf_agreement:.1%} is below "
                                    f"min_leaf_agreement={min_leaf_agreement:.1%}; kept soft"))
            continue
        model = set_submodule(model, name, FusedFFF(spec, where=where))
        confirmations[name] = outcome
        rewritten.append(Rewritten(
            where=where, form=spec.form_letter, depth=spec.depth, trees=spec.trees, d_in=spec.d_in, d_out=spec.d_out,
            source=spec.source, frontend="module", exactness=outcome.exactness, fidelity=fidelity,
            speedup_bound=spec.soft_macs() / spec.hard_macs(), description=spec.describe(),
            warning=fidelity_warning(fidelity),
            notes=(f"confirmed against its {outcome.forward} with hardened decisions; read as {outcome.reading}",
                   *outcome.notes)))
    left += [entry for name, entry in unreached.items() if not any(_inside(name, done) for done in settled)]
    return model, rewritten, left, confirmations
