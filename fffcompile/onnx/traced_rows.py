"""Regions that run only at the shape they were traced with: probed N traced rows at a time.

torch's legacy (TorchScript) exporter bakes the traced batch into some FFF graphs even with
``dynamic_axes``: a Python loop over the rows is unrolled N times (fastfeedforward's eval-mode
leaves: ``Gather(rows, i)`` ... ``ScatterND(out, [[i]], ...)`` for i < N), or ``zeros_like`` of a
value becomes a constant of the traced shape. The graph input stays symbolic, but the region
fails, or silently leaves rows unwritten, at any other number of rows. What such a region
computes on its traced rows is still one FFF applied to each row, and the fused node that
replaces it is batch-generic: the rewrite generalises the file.

1. ``is_baked``: the region is run at a probe shape on rows X and at twice the rows [X; X]
   (stacked on the first axis); a batch-generic region runs at both and repeats its rows. One
   that fails or does not repeat them is a candidate; nothing else is ever retried.
2. ``traced_leads``: the leading dims it may have been traced with, read off the region's
   constants: prefixes of constant shapes and of small 1-D integer constants (a baked
   ``[2, 3, 2, 1]``), and 1 + the largest constant row index of a Gather / Scatter (an
   unrolled loop over N rows: (1, ..., 1, N)). A lead is kept where the region runs on it, computes
   each row from its own input (reversing the rows reverses the output) and, on twice its rows,
   fails or disagrees (it really is bound to that shape).
3. ``TracedIndex``: the graph index whose cut-outs that read X run ``Chunked``: any number R of
   probe rows is fed N rows at a time at the traced shape (the last chunk padded with the
   first rows, cyclically), every cut input (X, the decisions and activations extractors feed)
   split by its rows and laid out as that value is at the traced shape, every output read
   back as rows. The extractors and ``confirm`` run unchanged on it (a soft tree's sigmoids are
   hardened in the chunked cut-out, ``Chunked.hardened``), so the spec is read and confirmed on
   independent random rows of every chunk, all of them at the traced shape.

Such a region's output often has a static inferred shape (a baked constant broadcast into it):
``region.candidate_regions`` tries static-shaped outputs after the others, not never.

Must not fire on a batch-generic region (step 1), nor on one whose values do not keep the rows
apart at the traced shape (its cut-outs refuse to chunk); a look-alike still faces extraction and
confirmation against ``reference.hard`` on every traced row.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import onnx

from ..errors import InvalidModelError
from .graph_index import GraphIndex, make_session
from .probes import columns, feed_shape, probe_shapes, x_layout
from .region import Region

MAX_ROWS = 4096
MAX_LEADS = 8
ROW_INDEX_OPS = ("Gather", "ScatterND", "ScatterElements", "GatherND")


def _sample(index: GraphIndex, region: Region, lead: tuple[int, ...], d_in: int, seed: int) -> np.ndarray:
    """Standard normal rows for X at ``lead``, in X's element type."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(index.elem_type(region.x) or onnx.TensorProto.FLOAT)
    return np.random.default_rng(seed).standard_normal(lead + (d_in,)).astype(dtype)


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal to 1e-5, relative to the larger of 1 and ``want``'s largest magnitude."""
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    return bool(np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-5, atol=1e-5 * scale))


def _repeats(session, index: GraphIndex, region: Region, lead: tuple[int, ...], d_in: int,
             seeds: tuple[int, ...] = (3, 4, 5)) -> Optional[bool]:
    """Whether the region's output on rows [X; X] (twice ``lead``'s first dim) repeats its output on X, for every
    one of several samples X (one could hide unwritten rows: a small ReLU tree outputs exact zeros for many rows);
    None when it does not run at ``lead`` itself."""
    answers = [_repeats_once(session, index, region, lead, d_in, seed) for seed in seeds]
    return None if None in answers else all(answers)


def _repeats_once(session, index: GraphIndex, region: Region, lead: tuple[int, ...], d_in: int, seed: int
                  ) -> Optional[bool]:
    x = _sample(index, region, lead, d_in, seed)
    try:
        y = np.asarray(session.run([region.y], region.feed(index, x))[0])
    except Exception:
        return None
    try:
        yy = np.asarray(session.run([region.y], region.feed(index, np.concatenate([x, x])))[0])
    except Exception:
        return False
    if yy.shape[1:] != y.shape[1:] or yy.shape[0] != 2 * y.shape[0]:
        return False
    return _same(yy, np.concatenate([y, y]))


def _row_local(session, index: GraphIndex, region: Region, lead: tuple[int, ...], d_in: int, seed: int) -> bool:
    """Whether the region runs at ``lead`` and reversing its input rows reverses its output rows (every row
    computed from its own input: an unrolled loop over fewer rows than ``lead`` leaves the rest unwritten)."""
    x = _sample(index, region, lead, d_in, seed)
    flip = x.reshape(-1, d_in)[::-1].reshape(x.shape)
    try:
        y, yf = (np.asarray(session.run([region.y], region.feed(index, v))[0]).astype(np.float64) for v in (x, flip))
        n = math.prod(lead)
        y, yf = columns(y, n), columns(yf, n)
    except Exception:
        return False
    return _same(yf[::-1], y)


def is_baked(index: GraphIndex, region: Region) -> Optional[object]:
    """A session of the region when it is bound to one shape (see the module doc), else None."""
    try:
        rank, d_in = x_layout(index.shape(region.x))
        session = make_session(index.submodel(region.nodes, region.inputs, [region.y]))
    except Exception:
        return None
    lead = tuple(probe_shapes(rank, d_in)[0][:-1])
    return session if _repeats(session, index, region, lead, d_in) is not True else None


def _constant(index: GraphIndex, name: str) -> tuple[Optional[tuple[int, ...]], Optional[np.ndarray]]:
    """(shape, value) of an initializer or a Constant node's output (the value only when it is small and integer),
    the shape of a ConstantOfShape of such a constant; (None, None) for other computed constants (not evaluated)."""
    tensor = index.initializers.get(name)
    producer = index.producer_node(name)
    if tensor is None and producer is not None and producer.op_type == "ConstantOfShape":
        _, shape = _constant(index, producer.input[0])
        return (None, None) if shape is None else (tuple(int(d) for d in shape), None)
    if tensor is None and producer is not None and producer.op_type == "Constant":
        tensor = next((a.t for a in producer.attribute if a.name == "value"), None)
    if tensor is None:
        return None, None
    small = tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and math.prod(tensor.dims) <= 64
    return tuple(tensor.dims), onnx.numpy_helper.to_array(tensor) if small else None


def traced_leads(index: GraphIndex, region: Region, session=None) -> list[tuple[int, ...]]:
    """The leading shapes the region may have been traced with (module doc, step 2), most specific first."""
    rank, d_in = x_layout(index.shape(region.x))
    width = rank - 1
    leads, counts = [], []
    for i in sorted(region.x_nodes):
        node = index.nodes[i]
        for k, name in enumerate(index.inputs_of[i]):
            if not name or name not in index.constant:
                continue
            shape, value = _constant(index, name)
            if shape is None:
                continue
            if len(shape) >= width:
                leads.append(shape[:width])
            if value is None:
                continue
            if value.ndim == 1 and value.size >= width:
                leads.append(tuple(int(v) for v in value[:width]))
            if k == 1 and node.op_type in ROW_INDEX_OPS and value.size and value.max() >= 0:
                counts.append(int(value.max()) + 1)
    leads += [(1,) * (width - 1) + (n,) for n in sorted(set(counts), reverse=True)]
    out = []
    for lead in dict.fromkeys(leads):
        if all(isinstance(d, int) and d >= 1 for d in lead) and 1 <= math.prod(lead) <= MAX_ROWS:
            out.append(lead)
    if session is None:
        session = make_session(index.submodel(region.nodes, region.inputs, [region.y]))
    kept = []
    for lead in out:
        if _repeats(session, index, region, lead, d_in) is False \
                and _row_local(session, index, region, lead, d_in, seed=6):     # runs there, row by row, and only there
            kept.append(lead)
        if len(kept) >= MAX_LEADS:
            break
    return kept


def value_layouts(index: GraphIndex, region: Region, lead: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shape of every value the region computes from X, at the traced lead."""
    rank, d_in = x_layout(index.shape(region.x))
    names = [o for i in sorted(region.x_nodes) for o in index.nodes[i].output if o]
    model = index.submodel(region.nodes, region.inputs, names)
    x = _sample(index, region, lead, d_in, seed=5)
    values = make_session(model).run(names, region.feed(index, x))
    return {region.x: lead + (d_in,), **{n: tuple(np.shape(v)) for n, v in zip(names, values)}}


class Chunked:
    """A cut-out that reads X, run on any number of rows N traced rows at a time (module doc, step 3)."""

    def __init__(self, model: onnx.ModelProto, traced: "TracedIndex"):
        self.model = model
        self.traced = traced
        self._session = None

    def hardened(self, sigmoids, tie: str) -> "Chunked":
        """The same cut-out with the named sigmoids hardened (``harden.harden_sigmoids``), run the same way."""
        from .harden import harden_sigmoids
        return Chunked(harden_sigmoids(self.model, sigmoids, tie=tie), self.traced)

    def run(self, outputs, feeds):
        t = self.traced
        region, lead, layouts = t.region, t.lead, t.layouts
        if self._session is None:
            self._session = make_session(self.model)
        x = np.asarray(feeds[region.x])
        d_in = x.shape[-1]
        R, N = x.size // d_in, math.prod(lead)
        rows = {name: columns(v, R) for name, v in feeds.items() if name not in region.shape_sources}
        chunks = math.ceil(R / N)
        order = np.arange(chunks * N) % R
        got = {o: [] for o in outputs}
        for c in range(chunks):
            pick = order[c * N:(c + 1) * N]
            chunk = region.feed(t.base, rows[region.x][pick].reshape(lead + (d_in,)))
            for name, r in rows.items():
                if name != region.x:
                    if name not in layouts:
                        raise InvalidModelError(f"{name!r} has no layout at the traced shape {lead}")
                    chunk[name] = r[pick].reshape(layouts[name])
            for o, v in zip(outputs, self._session.run(list(outputs), chunk)):
                got[o].append(columns(v, N))
        out = []
        for o in outputs:
            value = np.concatenate(got[o])[:R]
            layout = layouts.get(o)
            if layout is None:
                raise InvalidModelError(f"{o!r} has no layout at the traced shape {lead}")
            if tuple(layout[:len(lead)]) == tuple(lead):
                out.append(value.reshape(x.shape[:-1] + tuple(layout[len(lead):])))
            else:
                out.append(value.reshape(feed_shape(layout, N, R)))
        return out


class TracedIndex(GraphIndex):
    """``index`` (shared, not copied) whose cut-outs that read the region's X run ``Chunked`` at ``lead``."""

    def __init__(self, index: GraphIndex, region: Region, lead: tuple[int, ...]):
        self.__dict__.update(index.__dict__)
        self.base, self.region, self.lead = index, region, tuple(lead)
        self.layouts = value_layouts(index, region, self.lead)

    def submodel(self, node_ids, inputs, outputs, input_shapes=None):
        model = GraphIndex.submodel(self, node_ids, inputs, outputs, input_shapes)
        return Chunked(model, self) if self.region.x in inputs else model


def traced_indexes(index: GraphIndex, region: Region) -> Iterator[TracedIndex]:
    """A ``TracedIndex`` per traced lead of a region bound to one shape; nothing for a batch-generic one."""
    session = is_baked(index, region)
    if session is None:
        return
    for lead in traced_leads(index, region, session):
        try:
            yield TracedIndex(index, region, lead)
        except Exception:
            continue
