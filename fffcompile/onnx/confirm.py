"""Confirmation by numbers: the cut-out region, hardened, against ``reference.hard(spec, x)``.

The region X -> Y is cut out as its own ONNX model; for a soft tree its router sigmoids are
hardened (``harden.harden_sigmoids``: p = [z >= 0]), which is exactly the hard descent when the
region is the tree the spec describes (FORMS.md). It runs in ONNX Runtime on random probe
inputs at two shapes unlike the exported ones; the outputs must have the reference's shape and
values to float tolerance (rows whose path meets a near tie are left out, ``verify.exactness``).
A wrong heap order, swapped children, a mixture whose paths are not a tree, a softmax gate or
any other look-alike fails here and is not rewritten. A 16-bit model is confirmed on its float32
twin (``widen``) to the tolerance of its own dtype (its constants, such as GELU's sqrt(2), are
16-bit values).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import reference
from ..compare import Comparison
from ..spec import FFFSpec
from ..verify import exactness
from .graph_index import GraphIndex, evaluate, make_session
from .harden import harden_sigmoids
from .probes import probe_shapes, x_layout
from .region import Region


def confirm(index: GraphIndex, region: Region, spec: FFFSpec, sigmoids=(), seed: int = 0,
            scale: float = 1.0) -> tuple[Optional[Comparison], str]:
    """(the worst comparison, "") when the numbers hold, else (comparison or None, the reason); ``sigmoids``: names
    hardened with the spec's tie, or {name: tie}."""
    rank, d_in = x_layout(index.shape(region.x))
    model = index.submodel(region.nodes, region.inputs, [region.y])
    if sigmoids and hasattr(model, "hardened"):     # a region bound to its traced shape (``traced_rows.Chunked``)
        model = model.hardened(sigmoids, spec.tie)
    elif sigmoids:
        model = harden_sigmoids(model, sigmoids, tie=spec.tie)
    try:
        model = make_session(model)
    except Exception as error:
        return None, f"the cut-out subgraph does not load in ONNX Runtime: {str(error).splitlines()[0]}"
    rng = np.random.default_rng(seed)
    np_dtype = np.float64 if spec.dtype == torch.float64 else np.float32
    worst = None
    for shape in probe_shapes(rank, d_in):
        x = (rng.standard_normal(shape) * scale).astype(np_dtype)
        try:
            got = evaluate(model, region.feed(index, x), [region.y])[region.y]
        except Exception as error:
            return None, f"the cut-out subgraph does not run at input shape {shape}: {str(error).splitlines()[0]}"
        xt = torch.from_numpy(x)
        want = reference.hard(spec, xt)
        if tuple(got.shape) != tuple(want.shape):
            return None, f"the subgraph's output has shape {tuple(got.shape)} at input {shape}, the spec's {tuple(want.shape)}"
        got = torch.from_numpy(np.asarray(got))
        narrow = getattr(index, "narrow_dtypes", {}).get(region.x)      # a 16-bit model read through its float32 twin
        comparison = exactness(spec, xt, got if narrow is None else got.to(narrow), actual=want)
        if not comparison.passed:
            return comparison, f"the hardened subgraph differs from the extracted {spec.describe()} ({comparison.summary()})"
        if worst is None or comparison.max_rel_error > worst.max_rel_error:
            worst = comparison
    return worst, ""
