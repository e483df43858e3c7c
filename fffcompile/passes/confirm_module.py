"""Module frontend, step 2: confirm a candidate module by numbers before it is replaced.

For each reading of the module's tensors (``module_signatures.interpretations``), the spec's
reference ``reference.hard(spec, x)`` must reproduce the module's own forward with hardened
decisions (``harden.hardened_sigmoids``) on probe inputs: the module's recorded real inputs
plus random rows of the same shape. Two forwards are tried, in order:

1. the module as the model runs it (its eval forward when the model is in eval mode);
2. its training forward (``training`` set on the module itself only, children untouched, so
   dropout stays off and batch norms do not update), for layers whose eval forward is a
   different code path (the fastfeedforward package's per-row descent, which omits b2s).

A forward that is random (two runs differ: dropout inside, region leaks) cannot confirm.
Half-precision modules are confirmed on a float32 copy (the structure is dtype-independent and
float32 ties are rarer); the spec returns in the module's dtype. Refusals carry a reason and
the nearest reading with the tolerance it would have needed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .. import reference
from ..compare import Comparison, compare
from ..errors import InvalidSpecError
from ..report import Fidelity
from ..spec import FFFSpec
from ..verify import exactness, measure_fidelity
from .harden import hardened_sigmoids
from .module_signatures import interpretations
from .record_inputs import Calls

_PROBE_ROWS = 512
_MAX_READINGS = 2000


@dataclass
class Confirmed:
    spec: FFFSpec
    reading: str
    forward: str                 # "eval forward" or "training forward"
    exactness: Comparison
    fidelity: Fidelity
    notes: list[str] = field(default_factory=list)


@dataclass
class Refused:
    reason: str
    near_miss: Optional[str] = None


def sigmoid_leaves(spec: Optional[FFFSpec]) -> bool:
    return spec is not None and (spec.activation == "sigmoid" or spec.master_activation == "sigmoid")


def leaf_preactivations(spec: FFFSpec, x: torch.Tensor) -> torch.Tensor:
    """(rows, F): the values a sigmoid leaf activation of ``spec`` reads for input x (leaves, master, neurons)."""
    X = x.reshape(-1, spec.d_in).double()
    if spec.form == "neuron_tree":
        return (torch.einsum("rd,pnd->rpn", X, spec.node_weight.double()) + spec.node_bias.double()).reshape(X.shape[0], -1)
    parts = [(torch.einsum("rd,ldh->rlh", X, spec.leaf_w1.double()) + spec.leaf_b1.double()).reshape(X.shape[0], -1)]
    if spec.master_w1 is not None:
        parts.append(X @ spec.master_w1.double() + spec.master_b1.double())
    return torch.cat(parts, 1)


def run_original(module: nn.Module, x: torch.Tensor, training: bool, harden: bool,
                 spec: Optional[FFFSpec] = None) -> torch.Tensor:
    """module(x) with ``training`` set on the module itself only, optionally with hardened sigmoids
    (those reading ``spec``'s leaf pre-activations, when its leaves' activation is a sigmoid, kept as they are)."""
    saved = module.training
    module.training = training
    try:
        with torch.no_grad():
            if harden:
                keep = leaf_preactivations(spec, x) if sigmoid_leaves(spec) else None
                with hardened_sigmoids(rows=x.numel() // max(1, x.shape[-1]), leaf_preactivations=keep):
                    return module(x)
            return module(x)
    finally:
        module.training = saved


def _probes(inputs: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """The recorded inputs, then random inputs of the same trailing shape with the same per-feature statistics."""
    d_in = inputs[0].shape[-1]
    rows = torch.cat([x.reshape(-1, d_in).float() for x in inputs])
    mean, std = rows.mean(0), rows.std(0, unbiased=False) if rows.shape[0] > 1 else rows.abs().mean(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    template = inputs[0]
    per_item = template[0].numel() // d_in if template.dim() > 1 else 1
    items = max(1, -(-_PROBE_ROWS // max(1, per_item)))
    shape = (items, *template.shape[1:]) if template.dim() > 1 else template.shape
    noise = torch.randn(shape, generator=generator) * std + mean
    return list(inputs) + [noise.to(template.dtype)]


def _hardened_outputs(module, probes, training, forward_name, d_out, seed, spec=None):
    """The module's hardened outputs on every probe, or a reason why this forward cannot confirm."""
    try:
        outs = [run_original(module, x, training, harden=True, spec=spec) for x in probes]
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            again = run_original(module, probes[-1], training, harden=True, spec=spec)
    except Exception as error:  # a third-party forward may refuse probe shapes or modes
        return f"its {forward_name} failed on probe inputs ({type(error).__name__}: {error})"
    if not all(isinstance(y, torch.Tensor) and y.shape[-1] == d_out for y in outs):
        return f"its {forward_name} does not return one (..., {d_out}) tensor"
    if not torch.equal(again, outs[-1]):
        return f"its {forward_name} is random (dropout or region leak inside)"
    return torch.cat([y.reshape(-1, d_out) for y in outs])


def confirm(module: nn.Module, calls: Calls, seed: int = 0) -> Union[Confirmed, Refused]:
    """Confirm ``module``, every recorded call of which was module(x) -> y (``Calls.single_tensor_calls``)."""
    inputs = [a[0] for a in calls.args]
    if not inputs[0].is_floating_point():
        return Refused(f"its input is {inputs[0].dtype}, not floating point")
    d_in, d_out = inputs[0].shape[-1], calls.outputs[0].shape[-1]
    original_dtype = inputs[0].dtype
    probe_module = module
    if original_dtype in (torch.float16, torch.bfloat16):
        probe_module = copy.deepcopy(module).float()
        inputs = [x.float() for x in inputs]
    probes = _probes(inputs, torch.Generator().manual_seed(seed))
    X = torch.cat([x.reshape(-1, d_in) for x in probes])
    # (name, training flag) of each forward that can confirm: as the model runs it, then its training forward
    forwards = [("eval forward", False), ("training forward", True)] if not module.training else [("forward", True)]
    expected, reasons = {}, []
    for name, training in forwards:
        outcome = _hardened_outputs(probe_module, probes, training, name, d_out, seed)
        if isinstance(outcome, str):
            reasons.append(outcome)
        else:
            expected[name] = outcome
    best: Optional[tuple[float, str]] = None
    by_leaves: dict = {}      # sigmoid leaves: the hardened outputs per leaf pre-activation reading

    def expected_for(spec):
        if not sigmoid_leaves(spec):
            return expected
        key = _leaf_key(spec)
        if key not in by_leaves:
            by_leaves[key] = {}
            for name, training in forwards:
                outcome = _hardened_outputs(probe_module, probes, training, name, d_out, seed, spec=spec)
                if not isinstance(outcome, str):
                    by_leaves[key][name] = outcome
        return by_leaves[key]

    for count, (spec, reading) in enumerate(_readings(probe_module, d_in, d_out)):
        if count >= _MAX_READINGS or not expected:
            break
        if spec.dtype != X.dtype:
            continue
        actual = reference.hard(spec, X)
        for name, hard_out in expected_for(spec).items():
            result = exactness(spec, X, hard_out, actual=actual)
            if result.passed and result.ties_excluded < X.shape[0] // 2:
                outs = expected_for(spec)
                soft_forward = "training forward" if "training forward" in outs and bool(
                    exactness(spec, X, outs["training forward"], actual=actual)) else name
                return _confirmed(probe_module, spec, reading, name, dict(forwards)[soft_forward], result, inputs,
                                  calls, original_dtype)
            if best is None or result.needed_rtol < best[0]:
                best = (result.needed_rtol, f"{spec.describe()} [{reading}] via its {name}: {result.summary()}")
    if not expected:
        return Refused("; ".join(reasons))
    if best is None:
        return Refused("its tensors fit an FFF by shape, but no reading of them makes a valid FFF")
    return Refused("no reading of its tensors reproduces its forward with hardened decisions", best[1])


def _leaf_key(spec: FFFSpec) -> tuple:
    """Identifies a reading's leaf pre-activation weights by content (readings differ mostly in node biases)."""
    tensors = [spec.node_weight, spec.node_bias] if spec.form == "neuron_tree" else \
        [spec.leaf_w1, spec.leaf_b1, spec.master_w1, spec.master_b1]
    return tuple(None if t is None else (tuple(t.shape), t.detach().contiguous().numpy().tobytes()) for t in tensors)


def _readings(module, d_in, d_out):
    stream = interpretations(module, d_in, d_out)
    while True:
        try:
            yield next(stream)
        except StopIteration:
            return
        except InvalidSpecError:
            continue


def _confirmed(module, spec, reading, forward_name, soft_training, result, inputs, calls, original_dtype):
    """Source, fidelity and notes of a confirmed reading, measured on the recorded real inputs.

    The soft original for fidelity is the training forward when it hardens to the same reference
    (a layer whose eval forward is already hard, like the fastfeedforward package's or
    fffcompile.nn.FFF), else the forward that confirmed (``soft_training`` says which).
    """
    X_real = torch.cat([x.reshape(-1, spec.d_in) for x in inputs])
    hard_real = reference.hard(spec, X_real)
    as_run = torch.cat([y.reshape(-1, spec.d_out).float() for y in calls.outputs])
    source = "hard" if spec.form == "neuron_tree" or bool(compare(hard_real.to(as_run.dtype), as_run)) else "soft"
    soft_real = torch.cat([run_original(module, x, soft_training, harden=False).reshape(-1, spec.d_out) for x in inputs])
    spec = spec.replace(source=source)
    fidelity = measure_fidelity(spec, X_real, soft_real, hard_real)
    notes = []
    if forward_name == "training forward":
        drift = compare(hard_real.to(as_run.dtype), as_run)
        notes.append(f"the layer's own eval forward differs from its hardened training form "
                     f"(max rel. error {drift.max_rel_error:.2g}); the rewrite computes the hard form of "
                     f"FORMS.md, as confirmed against the training forward")
    return Confirmed(spec.detached().to(original_dtype), reading, forward_name, result, fidelity, notes)
