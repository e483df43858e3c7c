"""Compare two ONNX models in ONNX Runtime: the optimized file against the original it came from.

``verify_models(original, optimized, sigmoids=..., inputs=...)`` runs both on the same inputs
(generated, or the user's ``.npz``) and compares every output (``compare.compare``; the absolute
tolerance scales with the output's magnitude, as in ``fffcompile.verify.exactness``):

- exactness (never waived): the optimized model against the original with the named Sigmoid
  nodes of each rewritten FFF hardened (``harden.harden_sigmoids``); with no sigmoids named
  (a hard original: form B, an eval-mode export) against the original itself;
- fidelity (reported): the optimized model against the original as is, when sigmoids were
  hardened (a soft original).

Outputs pair by name (a rewrite keeps the original's names), else by position.

Near ties: two correct computations of a logit that is within rounding of zero may send a row
to different leaves. ``tie_checks`` names, per rewritten FFF, its spec and the value in the
original graph that feeds it; rows whose path meets such a decision (``reference.near_ties``)
are excluded from outputs with the same number of rows, and counted.

Generated inputs: float inputs are standard normal, integer inputs 0 or 1 (token ids in range
for any vocabulary), bool inputs random; a symbolic dim takes ``dim_size`` (default 3, other
than the sizes exporters trace with), or, where the original does not run there, a size it does run at
(``runnable_inputs``: only sizes at which a rewritten region bound to its traced rows gets them; then
``TRACED_SAMPLES`` independent samples at that shape are compared together). Pass real data as ``.npz``
where it matters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import onnx
import torch

from .. import reference
from ..compare import Comparison, compare, default_tolerance
from ..errors import InvalidModelError, UserError
from ..spec import FFFSpec
from .contract import FLOAT_TYPES, torch_dtype
from .harden import harden_sigmoids

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


@dataclass
class ModelVerification:
    exactness: dict[str, Comparison]                       # per output of the model
    fidelity: Optional[dict[str, Comparison]] = None       # per output, when the original is soft
    inputs: dict[str, tuple] = field(default_factory=dict)  # input name -> shape used

    @property
    def passed(self) -> bool:
        return all(self.exactness.values())

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        lines = [f"exactness vs the hardened original, output {name}: {c.summary()}" for name, c in self.exactness.items()]
        for name, c in (self.fidelity or {}).items():
            lines.append(f"fidelity vs the soft original, output {name}: {c.summary()}")
        return "\n".join(lines)


def session(model: ModelLike, threads: int = 0):
    """An ONNX Runtime CPU session of a model (a path keeps external data resolvable)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4       # a run that fails raises, with its message (no log line besides)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise InvalidModelError(f"ONNX Runtime cannot load the model: {str(error).splitlines()[0]}") from error


def _proto(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from .files import load_model
    return load_model(model)


def _numpy_type(elem_type: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def generate_inputs(model: ModelLike, seed: int = 0, dim_size: int = 3,
                    dims: Optional[Mapping[str, int]] = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer; ``dims`` fixes named dims."""
    model = _proto(model)
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise UserError(f"input {value.name!r} is not a tensor; pass inputs as an .npz file")
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, dim_size)
                 for d in tensor.shape.dim]
        dtype = np.dtype(_numpy_type(tensor.elem_type))
        if dtype.kind == "f" or dtype.name == "bfloat16":
            array = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            array = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            raise UserError(f"cannot generate input {value.name!r} of type {dtype}; pass inputs as an .npz file")
        feeds[value.name] = array
    return feeds


# Sizes tried for the symbolic dims, in order, when the original does not run with all of them at 3: legacy
# exports often bake one dim (the sequence length of an attention reshape) into constants, and a file gives no
# hint of the exported size. All symbolic dims take the same size in one try.
DIM_SIZES = (3, 1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 16, 24, 32, 48, 64, 128)


def runnable_inputs(model: ModelLike, seed: int = 0, traced: Sequence[Mapping[str, int]] = (),
                    bound_rows: Optional[Mapping[str, int]] = None) -> dict[str, np.ndarray]:
    """Generated inputs the original runs on: symbolic dims at 3, else at the first size of ``DIM_SIZES`` that
    ONNX Runtime accepts, else at sizes read off the model's constants (``traced_dims``); raises the error of the
    size-3 try when none does.

    ``bound_rows``: {value inside the model: the rows it is bound to} for rewritten regions that run (or are
    right) only at their traced shape: then only inputs at which every such value has those rows are taken,
    tried first at ``traced`` ({symbolic dim: size}) and at the symbolic dims' sizes whose product is the rows."""
    model = _proto(model)
    if not any(d.dim_param or not d.HasField("dim_value") for v in model.graph.input
               for d in v.type.tensor_type.shape.dim):
        return generate_inputs(model, seed=seed)
    first_error = None
    bound = dict(bound_rows or {})
    run_original = runner(model, extra_outputs=list(bound))
    tries = [(3, dims) for dims in [*traced, *_dims_with_rows(model, bound)]] if bound else []
    tries += [(size, None) for size in DIM_SIZES] + [(3, dims) for dims in traced_dims(model)]
    for size, dims in tries:
        feeds = generate_inputs(model, seed=seed, dim_size=size, dims=dims)
        try:
            values = run_original(feeds)
        except InvalidModelError as error:
            first_error = first_error or error
            continue
        if all(np.size(values[name]) // max(1, np.shape(values[name])[-1]) == rows for name, rows in bound.items()):
            return feeds
    if bound:
        raise InvalidModelError(f"the original runs only at its traced shape ({bound} rows) and no generated input "
                                f"reaches it; pass inputs of that shape (--inputs data.npz) or skip the whole-model "
                                f"check (--no-verify)")
    raise InvalidModelError(f"{first_error}; the original itself runs with no common size of its symbolic dims "
                            f"in {DIM_SIZES[0]}..{DIM_SIZES[-1]}, nor at sizes read off its constants") from first_error


def _symbolic_dims(model: onnx.ModelProto) -> list[str]:
    """The named symbolic dims of the model's inputs, in order of first appearance."""
    return list(dict.fromkeys(d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim
                              if d.dim_param))


def _dims_with_rows(model: onnx.ModelProto, bound: Mapping[str, int]) -> list[dict[str, int]]:
    """Sizes of the (first three) symbolic input dims whose product is the bound row count, every divisor split."""
    names = _symbolic_dims(model)[:3]
    rows = next(iter(bound.values()), None)
    if not names or rows is None:
        return []
    splits = [[rows]]
    for _ in names[1:]:
        splits = [s[:-1] + [a, s[-1] // a] for s in splits for a in range(1, s[-1] + 1) if s[-1] % a == 0]
    splits.sort(key=lambda s: -min(s))          # the most even split first (a traced batch and sequence)
    return [dict(zip(names, s)) for s in splits[:32]]


def traced_dims(model: onnx.ModelProto, limit: int = 16) -> list[dict[str, int]]:
    """Sizes of the symbolic input dims a legacy export may have baked into constants (an attention reshape's
    ``[5, 6, 4]``): the leading values of small 1-D integer constants, taken by the symbolic dims in order."""
    names = _symbolic_dims(model)
    if not names:
        return []
    values = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1]
    values += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
               if a.name == "value" and a.t.data_type == onnx.TensorProto.INT64 and len(a.t.dims) == 1]
    out = []
    for tensor in values:
        if tensor.dims[0] > 8 or tensor.dims[0] < len(names):
            continue
        lead = [int(v) for v in onnx.numpy_helper.to_array(tensor)[:len(names)]]
        if all(v >= 1 for v in lead) and lead != [1] * len(names):
            candidate = dict(zip(names, lead))
            if candidate not in out:
                out.append(candidate)
        if len(out) >= limit:
            break
    return out


def load_inputs(npz_path: str, model: ModelLike) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` whose keys are the model's input names."""
    model = _proto(model)
    if not os.path.isfile(npz_path):
        raise UserError(f"{npz_path}: no such input file")
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except Exception as error:
        raise UserError(f"{npz_path}: not a readable .npz file ({error})") from error
    initializers = {i.name for i in model.graph.initializer}
    wanted = [v.name for v in model.graph.input if v.name not in initializers]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise UserError(f"{npz_path}: missing input(s) {missing}; the model takes {wanted}")
    return {n: feeds[n] for n in wanted}


def _bfloat16_io(model: onnx.ModelProto) -> bool:
    values = [*model.graph.input, *model.graph.output]
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in values)


def float32_interface(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its bfloat16 inputs and outputs taken and given as float32 (Cast inside); numpy and
    ONNX Runtime's Python API have no bfloat16, and float32 holds every bfloat16 value exactly."""
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    graph = model.graph
    casts = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == bf16:
            inner = f"{value.name}.bfloat16"
            for node in graph.node:
                node.input[:] = [inner if i == value.name else i for i in node.input]
            casts.append(onnx.helper.make_node("Cast", [value.name], [inner], to=bf16))
            value.type.tensor_type.elem_type = f32
    for value in graph.output:
        if value.type.tensor_type.elem_type == bf16:
            inner = f"{value.name}.bfloat16"
            for node in graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            graph.node.append(onnx.helper.make_node("Cast", [inner], [value.name], to=f32))
            value.type.tensor_type.elem_type = f32
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def run(model: ModelLike, feeds: Mapping[str, np.ndarray], extra_outputs: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """All graph outputs (plus ``extra_outputs``, values inside the main graph) by name; bfloat16 inputs and
    outputs are fed and returned as float32."""
    return runner(model, extra_outputs)(feeds)


def runner(model: ModelLike, extra_outputs: Sequence[str] = ()):
    """``run`` with the session loaded once: a function of the feeds (raises at once when the model cannot load)."""
    header = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model), load_external_data=False)
    proto = None
    if extra_outputs or _bfloat16_io(header):
        proto = onnx.ModelProto()
        proto.CopyFrom(_proto(model))
        proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra_outputs)
        float32_interface(proto)
    s = session(proto if proto is not None else model)
    names = [o.name for o in s.get_outputs()]

    def run_feeds(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # bfloat16 arrays (ml_dtypes) go in through the float32 interface
        feeds = {k: v.astype(np.float32) if getattr(v, "dtype", None) is not None and v.dtype.name == "bfloat16"
                 else v for k, v in feeds.items()}
        try:
            values = s.run(names, feeds)
        except Exception as error:
            raise InvalidModelError(f"ONNX Runtime failed to run the model: {str(error).splitlines()[0]}") from error
        return dict(zip(names, values))
    return run_feeds


def _near_tie_rows(values: dict, tie_checks) -> Optional[np.ndarray]:
    rows = None
    for spec, name in tie_checks:
        x = torch.from_numpy(np.asarray(values[name]))
        near = reference.near_ties(spec, x).numpy()
        rows = near if rows is None else (rows | near if rows.shape == near.shape else rows)
    return rows


def _pair(expected: dict, actual: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Outputs paired by name, or by position when the names differ but the counts agree."""
    if set(expected) <= set(actual):
        return [(name, want, actual[name]) for name, want in expected.items()]
    if len(expected) == len(actual):
        return [(name, want, got) for (name, want), got in zip(expected.items(), actual.values())]
    raise InvalidModelError(f"cannot pair outputs: the original has {sorted(expected)}, the optimized model {sorted(actual)}")


def compare_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: Optional[float] = None,
                    rtol: Optional[float] = None, exclude: Optional[np.ndarray] = None,
                    dtypes: Optional[Mapping[str, torch.dtype]] = None) -> dict[str, Comparison]:
    """Per-output comparisons (paired by name, else by position); ``exclude`` (rows) applies to outputs with that
    many rows; default tolerances follow ``dtypes[name]`` (the model's dtype, e.g. bfloat16 returned as float32)."""
    results = {}
    for name, want, got in _pair(expected, actual):
        e, a = torch.from_numpy(np.asarray(want)), torch.from_numpy(np.asarray(got))
        if not (e.is_floating_point() and a.is_floating_point()):
            e, a = e.double(), a.double()
        default_atol, default_rtol = default_tolerance((dtypes or {}).get(name, e.dtype))
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        width = e.shape[-1] if e.dim() else 1
        rows = e.numel() // max(1, width)
        mask = torch.from_numpy(exclude) if exclude is not None and exclude.shape[0] == rows and rows else None
        results[name] = compare(a, e, atol=(default_atol if atol is None else atol) * scale,
                                rtol=default_rtol if rtol is None else rtol, exclude=mask)
    return results


def verify_models(original: ModelLike, optimized: ModelLike, *, sigmoids: Union[Sequence[str], Mapping[str, str]] = (),
                  tie: str = "ge", inputs: Union[None, str, Mapping[str, np.ndarray]] = None,
                  tie_checks: Sequence[tuple[FFFSpec, str]] = (), seed: int = 0, atol: Optional[float] = None,
                  rtol: Optional[float] = None, traced: Sequence[Mapping[str, int]] = (),
                  bound_rows: Optional[Mapping[str, int]] = None) -> ModelVerification:
    """Exactness (and fidelity, for soft originals) of ``optimized`` against ``original``; see the module doc.
    ``traced``, ``bound_rows``: what the original is bound to (``runnable_inputs``), for generated inputs."""
    original_proto = _proto(original)
    if inputs is None:
        feeds = runnable_inputs(original_proto, seed=seed, traced=traced, bound_rows=bound_rows)
    elif isinstance(inputs, (str, os.PathLike)):
        feeds = load_inputs(os.fspath(inputs), original_proto)
    else:
        feeds = dict(inputs)
    hardened = harden_sigmoids(original_proto, sigmoids, tie=tie) if sigmoids else original
    extra = [name for _, name in tie_checks]
    outputs = {o.name for o in original_proto.graph.output}
    samples = [feeds]
    if inputs is None and bound_rows:       # one traced shape: more rows from independent samples at that shape
        samples += [_resample(feeds, seed + k) for k in range(1, TRACED_SAMPLES)]
    runs = [(run(optimized, f), run(hardened, f, extra_outputs=extra)) for f in samples]
    actual, values = _stacked([a for a, _ in runs]), _stacked([v for _, v in runs])
    exclude = None
    if tie_checks:
        masks = [_near_tie_rows(v, tie_checks) for _, v in runs]
        exclude = None if any(m is None for m in masks) else np.concatenate(masks)
    dtypes = {o.name: torch_dtype(o.type.tensor_type.elem_type) for o in original_proto.graph.output
              if o.type.tensor_type.elem_type in FLOAT_TYPES}
    narrow = [d for d in (torch.bfloat16, torch.float16) if any(spec.dtype == d for spec, _ in tie_checks)]
    if narrow:      # a 16-bit FFF bounds the precision of a wider output it feeds (an export that ends in float32)
        dtypes = {k: narrow[0] if v in (torch.float32, torch.float64) else v for k, v in dtypes.items()}
    expected = {k: v for k, v in values.items() if k in outputs}
    exact = compare_outputs(expected, actual, atol, rtol, exclude, dtypes)
    fidelity = None
    if sigmoids:
        soft = {k: v for k, v in _stacked([run(original, f) for f in samples]).items() if k in outputs}
        fidelity = compare_outputs(soft, actual, atol, rtol, dtypes=dtypes)
    return ModelVerification(exact, fidelity, {k: tuple(v.shape) for k, v in feeds.items()})


# Independent generated samples compared where the original runs only at one traced shape (few rows each).
TRACED_SAMPLES = 4


def _resample(feeds: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """New standard normal values for the float inputs, at the same shapes; other inputs as they are."""
    rng = np.random.default_rng(seed + 7919)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) if np.asarray(v).dtype.kind == "f" else v
            for k, v in feeds.items()}


def _stacked(results: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each output's values of several samples, concatenated along the first axis (one sample: as is)."""
    if len(results) == 1:
        return dict(results[0])
    return {k: np.concatenate([np.atleast_1d(r[k]) for r in results]) for k in results[0]}
