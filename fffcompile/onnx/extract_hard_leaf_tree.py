"""Form A, hard: the FFFSpec of a leaf-tree region that already descends (gathers by node and leaf index).

Such a graph computes every node's logit z = x W^T + b, picks the current node's logit per level
(Gather/GatherElements/GatherND by a data-dependent index), compares it with 0, steps the index,
then gathers the chosen leaf's weights from constant tensors of 2^D rows and applies them.

1. z is evaluated on X = 0, e_1 .. e_d and random rows: node_weight / node_bias (checked affine);
   2^D - 1 columns give the depth D.
2. The leaf weights are the constant data inputs (first dim 2^D) of the gathers whose indices
   depend on the decisions; their roles follow from their shapes: (L, d_in, l) is leaf_w1 (or
   (L, l, d_in) transposed), (L, l) leaf_b1, (L, l, d_out) leaf_w2, (L, d_out) leaf_b2. Where the
   shapes leave a choice (l == d_in, l == d_out), every reading is a hypothesis.
   Where no such table is gathered (every leaf computed, the reached one's output picked), the
   leaves are read by numbers instead (``extract_computed_leaves``).
3. The activation is not visible as one op (it acts on a gathered product): each activation
   fffcompile knows is a hypothesis, tried against the region's own output on probe rows before
   the formal confirmation.

Must not fire on a descent whose leaves are not read from such tables, or whose decisions do not
follow heap order: confirmation against ``reference.hard`` refuses them.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Optional

import numpy as np
import torch

from .. import reference
from ..spec import ACTIVATIONS, FFFSpec
from .extract_computed_leaves import computed_leaves
from .extract_leaf_tree import NotExtracted, input_dtypes, affine_probes, read_affine
from .detect import _float_source
from .graph_index import GraphIndex, evaluate, make_session
from .probes import columns, probe_shapes, shaped, x_layout
from .region import Region

GATHERS = ("Gather", "GatherND", "GatherElements")


def extract_hard_leaf_tree(index: GraphIndex, region: Region, comparisons: list[int], tie: str) -> Iterator[FFFSpec]:
    rank, d_in = x_layout(index.shape(region.x))
    dtype, np_dtype = input_dtypes(index, region)
    z = index.producer_node(_float_source(index, _logit(index, comparisons[0]))).input[0]
    probes = affine_probes(d_in)
    model = index.submodel(index.backward_slice([z], stop={region.x}) & region.nodes, region.inputs, [z])
    W, b = read_affine(columns(evaluate(model, region.feed(index, shaped(probes.astype(np_dtype), rank)), [z])[z],
                               probes.shape[0]), probes, "the node logits")
    n_nodes = W.shape[1]
    depth = (n_nodes + 1).bit_length() - 1
    if 2 ** depth - 1 != n_nodes:
        raise NotExtracted(f"{n_nodes} node logits is not 2^D - 1 for any depth D")
    leaves = 2 ** depth
    tables = {}             # by name: a loop unrolled over the rows gathers the same table once per row
    for i in sorted(region.x_nodes):
        node = index.nodes[i]
        if node.op_type in GATHERS and node.input[0] in index.constant and node.input[0] not in (z, *tables):
            value = index.constant_value(node.input[0])
            if value is not None and value.ndim in (2, 3) and value.shape[0] == leaves:
                tables[node.input[0]] = value.astype(np.float64)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    hypotheses = leaf_hypotheses(list(tables.values()), d_in, zero_b2=True)
    reproduced = False
    if hypotheses:
        x, want = region_sample(index, region, rank, d_in, np_dtype)     # picks the activation before ``confirm``
    for w1, b1, w2, b2 in hypotheses:
        for activation in ACTIVATIONS:
            spec = FFFSpec(form="leaf_mlp", depth=depth, activation=activation, node_weight=to(W.T), node_bias=to(b),
                           leaf_w1=to(w1), leaf_b1=to(b1), leaf_w2=None if w2 is None else to(w2),
                           leaf_b2=None if b2 is None else to(b2), tie=tie, source="hard")
            if reproduces(spec, x, want) is not None:
                reproduced = True
                yield spec
    if reproduced:
        return
    # every leaf computed, the reached one picked: read the leaves by numbers
    decisions = [o for i in comparisons for o in index.nodes[i].output if o]
    readings = list(computed_leaves(index, region, decisions, depth, np_dtype, exclude=(z,)))
    if not readings:
        raise NotExtracted("no reading of the leaf weight tables of 2^D rows gathered by the descent reproduces it, "
                           "and no leaf computed from its input is picked by it")
    for activation, w1, b1, w2, b2 in readings:
        yield FFFSpec(form="leaf_mlp", depth=depth, activation=activation, node_weight=to(W.T), node_bias=to(b),
                      leaf_w1=to(w1), leaf_b1=to(b1), leaf_w2=None if w2 is None else to(w2),
                      leaf_b2=None if b2 is None else to(b2), tie=tie, source="hard")


def region_sample(index: GraphIndex, region: Region, rank: int, d_in: int, np_dtype) -> tuple[np.ndarray, torch.Tensor]:
    """Random probe rows x and the region's own output on them (float64): what a weight-table reading must
    reproduce before it goes on to ``confirm``."""
    session = make_session(index.submodel(region.nodes, region.inputs, [region.y]))
    x = np.random.default_rng(1).standard_normal(probe_shapes(rank, d_in)[1]).astype(np_dtype)
    return x, torch.from_numpy(np.asarray(evaluate(session, region.feed(index, x), [region.y])[region.y])).double()


def reproduces(spec: FFFSpec, x: np.ndarray, want: torch.Tensor, output_bias: bool = False) -> Optional[FFFSpec]:
    """``spec`` when ``reference.hard`` of it reproduces ``want`` on x (1e-4), else None; ``output_bias``: form B
    whose output bias is not gathered: the constant difference is read as the bias."""
    got = reference.hard(spec, torch.from_numpy(x)).double()
    if got.shape != want.shape:
        return None
    scale = 1e-4 * max(1.0, float(want.abs().max()))
    if output_bias:      # form B without a gathered output bias: the constant difference is the bias
        diff = (want - got).reshape(-1, want.shape[-1])
        bias = diff.mean(0)
        if not torch.allclose(diff, bias.expand_as(diff), rtol=0, atol=scale):
            return None
        return spec.replace(out_bias=bias.to(spec.node_weight.dtype))
    return spec if torch.allclose(got, want, rtol=1e-4, atol=scale) else None


def _logit(index: GraphIndex, comparison: int) -> str:
    node = index.nodes[comparison]
    return node.input[0] if node.op_type in ("Greater", "GreaterOrEqual") else node.input[1]


def leaf_hypotheses(tables: list[np.ndarray], d_in: int, zero_b2: bool = False) -> list[tuple]:
    """Every reading (w1, b1, w2, b2) of leaf tables (first dim 2^D) by their shapes: (L, d_in, l) or its
    transpose is w1, (L, l) b1, (L, l, d_out) or its transpose w2, (L, d_out) b2 (with ``zero_b2``, zeros where no
    such table is gathered: fastfeedforward's eval leaves; w2 and b2 None: linear leaves).

    A weight table may also be stored flat, one row per leaf, and viewed per row after the gather:
    (L, d_in * l) read as (L, d_in, l) or (L, l, d_in) transposed, (L, l * d_out) as (L, l, d_out) or
    (L, d_out, l) transposed, where a (L, l) / (L, d_out) bias table fixes the width (the numbers decide
    which reading, if any, is the layer)."""
    threes = [t for t in tables if t.ndim == 3]
    twos = [t for t in tables if t.ndim == 2]
    widths = {t.shape[1] for t in twos}
    hypotheses = []
    for first, second in ([threes[0], threes[1]], [threes[1], threes[0]]) if len(threes) == 2 else \
            ([(threes[0], None)] if len(threes) == 1 else []):
        for w1 in {id(first): first, **({} if first.shape[2] != d_in else {-1: first.transpose(0, 2, 1)})}.values():
            if w1.shape[1] != d_in:
                continue
            width = w1.shape[2]
            b1s = [t for t in twos if t.shape[1] == width]
            if second is None:
                hypotheses += [(w1, b1, None, None) for b1 in b1s]
                continue
            for w2 in (second, second.transpose(0, 2, 1)):
                if w2.shape[1] != width:
                    continue
                b2s = [t for t in twos if t.shape[1] == w2.shape[2]]
                if not b2s and zero_b2:
                    b2s = [np.zeros((w2.shape[0], w2.shape[2]))]
                hypotheses += [(w1, b1, w2, b2) for b1, b2 in itertools.product(b1s, b2s) if b1 is not b2]
    if hypotheses or threes:
        return hypotheses
    for flat1 in twos:                       # flat tables: the widths come from the bias tables
        for width in sorted(widths):
            if flat1.shape[1] != d_in * width:
                continue
            for w1 in _unflatten(flat1, d_in, width):
                b1s = [t for t in twos if t is not flat1 and t.shape[1] == width]
                hypotheses += [(w1, b1, None, None) for b1 in b1s]
                for flat2 in twos:
                    if flat2 is flat1 or flat2.shape[1] % width or flat2.shape[1] // width not in widths:
                        continue
                    out = flat2.shape[1] // width
                    b2s = [t for t in twos if t is not flat1 and t is not flat2 and t.shape[1] == out]
                    for w2 in _unflatten(flat2, width, out):
                        hypotheses += [(w1, b1, w2, b2) for b1, b2 in itertools.product(b1s, b2s)
                                       if b1 is not b2 and b1 is not flat2]
    return hypotheses


def _unflatten(flat: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    """(L, rows * cols) as (L, rows, cols), read row-major or as the transpose of (L, cols, rows)."""
    L = flat.shape[0]
    readings = [flat.reshape(L, rows, cols)]
    if rows != 1 and cols != 1:
        readings.append(flat.reshape(L, cols, rows).transpose(0, 2, 1))
    return readings
