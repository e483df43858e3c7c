"""``fffcompile.export(model, example_inputs, path)``: a torch model to an ONNX file with fused FFF nodes.

1. ``fffcompile.optimize`` replaces every confirmed FFF layer by the fused op (skipped with
   ``optimize=False`` for a model that already runs ``torch.ops.fffcompile.*``);
2. ``torch.onnx.export(dynamo=True)`` with ``torch_translation.TRANSLATIONS`` turns each fused op
   into one node of the ``contract``; leading dims of every input are dynamic unless
   ``dynamic_shapes`` says otherwise (``Exported.notes`` says when an input came out static);
3. ``attach.attach_functions`` adds the overloads and function bodies (and, for target "trt",
   the plugin attributes);
4. with ``verify=True``, ONNX Runtime runs the file on the example inputs and on inputs whose
   dynamic dims differ from the exported ones; each must equal the optimized torch model (rows
   whose path meets a near tie, ``reference.near_ties``, are excluded and counted). A failure
   raises ``VerificationError`` and writes nothing;
5. the file is written atomically (``files.save_model_atomic``; external data for large models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx
import torch
from torch import nn

from ..compare import Comparison
from ..errors import InvalidModelError, UserError, VerificationError
from ..report import Report
from .attach import attach_functions
from .contract import check_target, is_fff_node
from .files import check_output_path, save_model_atomic
from .torch_translation import TRANSLATIONS
from .verify import compare_outputs, run


@dataclass
class Exported:
    path: str
    files: list[str]                                   # the model, then its external data file if any
    fff_nodes: dict[str, int]                          # op_type -> count
    report: Optional[Report] = None                    # what optimize() rewrote (None with optimize=False)
    checks: dict[str, dict[str, Comparison]] = field(default_factory=dict)   # input shapes -> per-output comparison
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        nodes = ", ".join(f"{n} {op}" for op, n in self.fff_nodes.items()) or "no fffcompile node"
        lines = [f"wrote {self.path} ({nodes})"]
        for shapes, outputs in self.checks.items():
            for name, comparison in outputs.items():
                lines.append(f"  ONNX Runtime vs torch at {shapes}, output {name}: {comparison.summary()}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise UserError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _default_dynamic_shapes(inputs: tuple):
    """Every dim but the last dynamic (torch.export.Dim.AUTO), for each tensor input."""
    return tuple({axis: torch.export.Dim.AUTO for axis in range(x.dim() - 1)} if isinstance(x, torch.Tensor) and x.dim() > 1
                 else None for x in inputs)


def _fused_layers(model: nn.Module):
    from ..runtime.fused_module import FusedFFF
    return [m for m in model.modules() if isinstance(m, FusedFFF)]


def _torch_outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The model's tensor outputs, flattened in the order torch's exporter lists them."""
    with torch.no_grad():
        out = model(*inputs)
    return [t.detach().cpu() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _near_tie_rows(model: nn.Module, inputs: tuple) -> Optional[np.ndarray]:
    """Rows (of the fused layers' inputs) whose path meets a near tie, OR-ed over layers with equal row counts."""
    from .. import reference
    layers, seen = _fused_layers(model), []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append((mod.spec, args[0].detach())))
             for layer in layers]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    rows = None
    for spec, x in seen:
        near = reference.near_ties(spec, x.to(spec.dtype)).cpu().numpy()
        if rows is None:
            rows = near
        elif rows.shape == near.shape:
            rows = rows | near
    return rows


def _resized(inputs: tuple, onnx_model: onnx.ModelProto) -> Optional[tuple]:
    """The example inputs with every dynamic dim of the exported graph grown by 2 (values tiled from the example)."""
    graph_inputs = [v for v in onnx_model.graph.input if v.name not in {i.name for i in onnx_model.graph.initializer}]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if len(graph_inputs) != len(tensors):
        return None
    grown, changed = [], False
    for x, value in zip(tensors, graph_inputs):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and x.shape[axis] > 0:
                size = x.shape[axis] + 2
                x = torch.cat([x] * -(-size // x.shape[axis]), dim=axis).narrow(axis, 0, size)
                changed = True
        grown.append(x)
    return tuple(grown) if changed else None


def _check(fast: nn.Module, inputs: tuple, onnx_model: onnx.ModelProto, staged: str, atol, rtol) -> dict[str, Comparison]:
    expected = _torch_outputs(fast, inputs)
    names = [o.name for o in onnx_model.graph.output]
    if len(expected) != len(names):
        raise InvalidModelError(f"the model returns {len(expected)} tensors but the exported graph has "
                                f"{len(names)} outputs; verify cannot pair them")
    graph_inputs = [v.name for v in onnx_model.graph.input if v.name not in {i.name for i in onnx_model.graph.initializer}]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    feeds = {name: (x.float() if x.dtype == torch.bfloat16 else x).detach().cpu().numpy()
             for name, x in zip(graph_inputs, tensors)}
    actual = run(staged, feeds)
    exclude = _near_tie_rows(fast, inputs)
    arrays = {name: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for name, t in zip(names, expected)}
    return compare_outputs(arrays, actual, atol, rtol, exclude, {name: t.dtype for name, t in zip(names, expected)})


def export(model: nn.Module, example_inputs, path: str, *, target: str = "onnx", dynamic_shapes: Any = None,
           verify: bool = True, optimize: bool = True, opset: Optional[int] = None,
           external_data: Optional[bool] = None, atol: Optional[float] = None, rtol: Optional[float] = None,
           **optimize_options) -> Exported:
    """Export ``model`` (its FFF layers fused) to ``path`` as ONNX for ``target`` "onnx" or "trt"; see the module doc."""
    check_target(target)
    path = check_output_path(path)
    if not isinstance(model, nn.Module):
        raise UserError(f"export() takes a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    report = None
    if optimize:
        from ..optimize import optimize as optimize_model
        model = optimize_model(model, inputs, verify=verify, **optimize_options)
        report = model.report
    if dynamic_shapes is None:
        dynamic_shapes = _default_dynamic_shapes(inputs)
    try:
        program = torch.onnx.export(model, inputs, dynamo=True, custom_translation_table=TRANSLATIONS,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False)
    except Exception as error:
        raise InvalidModelError(f"torch.onnx.export failed: {type(error).__name__}: "
                                f"{str(error).strip().splitlines()[0]}") from error
    onnx_model = attach_functions(program.model_proto, target)
    counts: dict[str, int] = {}
    for node in onnx_model.graph.node:
        if is_fff_node(node):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    notes = [f"input {v.name!r} has only static dims {[d.dim_value for d in v.type.tensor_type.shape.dim]}: the file "
             f"runs at that shape only (dynamic_shapes fixed them, or torch specialized them to the example)"
             for v in onnx_model.graph.input if len(v.type.tensor_type.shape.dim) > 1
             and not any(d.HasField("dim_param") for d in v.type.tensor_type.shape.dim)]
    checks: dict[str, dict[str, Comparison]] = {}
    samples = [inputs] + [grown for grown in [_resized(inputs, onnx_model)] if grown is not None]

    def check(staged: str) -> None:
        for sample in samples:
            key = ", ".join(str(tuple(x.shape)) for x in sample if isinstance(x, torch.Tensor))
            checks[key] = _check(model, sample, onnx_model, staged, atol, rtol)
            failed = [f"{name}: {c.summary()}" for name, c in checks[key].items() if not c]
            if failed:
                raise VerificationError(f"the exported ONNX model differs from the optimized torch model at input "
                                        f"shape {key} ({'; '.join(failed)}); nothing was written")

    files = save_model_atomic(onnx_model, path, external_data=external_data, check=check if verify else None)
    return Exported(path, files, counts, report, checks, notes)
