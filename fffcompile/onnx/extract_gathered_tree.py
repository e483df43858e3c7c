"""Hard trees that gather their node rows: the FFFSpec of a descent that never computes the other nodes.

UltraFastBERT's benchmark layers (and most hand-written hard paths) step a node index n per
level, gather that node's weight row from a constant table, z = x . W[n] (+ b[n]), compare z
with 0 (``detect``: the comparisons are grouped by the X they dot with and their tie rule) and
step n <- 2n + 1 + [z > 0]. Then either

- form B: y = sum over the path of act(z_level) V[n_level] (+ c), V gathered from a second
  table of the same 2^(D+1) - 1 rows, or
- form A: y = leaf MLP of the leaf reached, its weights gathered from tables of 2^D rows
  (``extract_hard_leaf_tree.leaf_hypotheses``), the node table having 2^D - 1 rows; or, where no
  leaf table is gathered, every leaf computed and the reached one's output picked: the leaves are
  then read by numbers (``extract_computed_leaves``).

Reading the weights: the node table is the constant 2-D table gathered inside the region whose
rows number 2^k - 1 (or, form B with P trees stored tree-major in one table, P (2^k - 1), each P a
hypothesis) and whose width is d_in (node biases: a gathered table of one per node, (rows,) or
(rows, 1), or none); the rest are the output / leaf tables. The activation acts on gathered values and is
not one op: every activation fffcompile knows is a hypothesis. Each hypothesis is run through
``reference.hard`` on probe rows and kept only where it reproduces the region's own output (a
form-B output bias is the constant difference); ``confirm`` then checks the survivor formally.

Must not fire on a descent whose tables are not in heap order or whose step is not the binary
recurrence: no hypothesis reproduces its output, and nothing is rewritten.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch

from ..spec import ACTIVATIONS, FFFSpec
from .extract_computed_leaves import computed_leaves
from .extract_leaf_tree import NotExtracted, input_dtypes
from .extract_hard_leaf_tree import GATHERS, leaf_hypotheses, region_sample, reproduces
from .graph_index import GraphIndex
from .probes import x_layout
from .region import Region


def gathered_tables(index: GraphIndex, region: Region) -> list[np.ndarray]:
    """The constant tables (1-D to 3-D) that gathers inside the region read rows of, in graph order, once each."""
    seen, tables = set(), []
    for i in sorted(region.x_nodes):
        node = index.nodes[i]
        if node.op_type in GATHERS and node.input[0] in index.constant and node.input[0] not in seen:
            value = index.constant_value(node.input[0])
            if value is not None and 1 <= value.ndim <= 3 and value.dtype.kind == "f":
                seen.add(node.input[0])
                tables.append(np.asarray(value, dtype=np.float64))
    return tables


def tree_counts(rows: int) -> list[int]:
    """The tree counts P for which a table of ``rows`` rows holds P trees of 2^k - 1 nodes each (tree-major)."""
    return [P for P in range(1, rows + 1) if rows % P == 0 and (rows // P + 1) & (rows // P) == 0]


def extract_gathered_tree(index: GraphIndex, region: Region, tie: str, comparisons: tuple[int, ...] = ()
                          ) -> Iterator[FFFSpec]:
    rank, d_in = x_layout(index.shape(region.x))
    dtype, np_dtype = input_dtypes(index, region)
    tables = gathered_tables(index, region)
    node_tables = [t for t in tables if t.ndim == 2 and t.shape[1] == d_in and tree_counts(t.shape[0])]
    if not node_tables:
        raise NotExtracted("no constant table of 2^k - 1 rows of width d_in is gathered by the descent")
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    x, want = region_sample(index, region, rank, d_in, np_dtype)
    decisions = [o for i in comparisons for o in index.nodes[i].output if o]
    readings = {}

    def computed(depth):        # the leaves read by numbers (no leaf tables gathered), once per depth
        if depth not in readings:
            readings[depth] = list(computed_leaves(index, region, decisions, depth, np_dtype))
        return readings[depth]

    for W, P in ((W, P) for W in node_tables for P in tree_counts(W.shape[0])):
        rows = W.shape[0]
        n = rows // P
        no_leaf_tables = decisions and not any(t.shape[0] == n + 1 for t in tables if t is not W)
        # node biases: a table of one per node, (rows,) or (rows, 1) (fastfeedforward's node_biases)
        biases = [None] + [t.reshape(rows) for t in tables if t.ndim <= 2 and t.shape[0] == rows and t.size == rows]
        rest = [t for t in tables if t is not W]
        for b, activation in itertools.product(biases, ACTIVATIONS):
            bias = np.zeros(rows) if b is None else b
            # form B: a second table of the same rows holds the output rows (P trees: tree-major, P n rows)
            for V in (t for t in rest if t.ndim == 2 and t.shape[0] == rows):
                depth = (n + 1).bit_length() - 2
                if depth < 1:
                    continue
                spec = FFFSpec(form="neuron_tree", depth=depth, activation=activation,
                               node_weight=to(W.reshape(P, n, d_in)), node_bias=to(bias.reshape(P, n)),
                               out_weight=to(V.reshape(P, n, -1)), out_bias=to(np.zeros(V.shape[1])),
                               tie=tie, source="hard")
                found = reproduces(spec, x, want, output_bias=True)
                if found is not None:
                    yield found
            if P != 1:
                continue
            # form A: leaf tables of n + 1 rows
            depth = (n + 1).bit_length() - 1
            if no_leaf_tables and activation == ACTIVATIONS[0]:
                for act, w1, b1, w2, b2 in computed(depth):     # every leaf computed, the reached one picked
                    spec = FFFSpec(form="leaf_mlp", depth=depth, activation=act, node_weight=to(W), node_bias=to(bias),
                                   leaf_w1=to(w1), leaf_b1=to(b1), leaf_w2=None if w2 is None else to(w2),
                                   leaf_b2=None if b2 is None else to(b2), tie=tie, source="hard")
                    found = reproduces(spec, x, want, output_bias=False)
                    if found is not None:
                        yield found
            for w1, b1, w2, b2 in leaf_hypotheses([t for t in rest if t.shape[0] == n + 1], d_in, zero_b2=True):
                spec = FFFSpec(form="leaf_mlp", depth=depth, activation=activation, node_weight=to(W),
                               node_bias=to(bias), leaf_w1=to(w1), leaf_b1=to(b1),
                               leaf_w2=None if w2 is None else to(w2), leaf_b2=None if b2 is None else to(b2),
                               tie=tie, source="hard")
                found = reproduces(spec, x, want, output_bias=False)
                if found is not None:
                    yield found
