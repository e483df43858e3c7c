"""Read a tree unrolled over the example's rows (an eval graph specialised to one batch size).

A per-row Python loop (``for r in range(B): ... x[r] ...``), captured statically, is B copies of
one program: row r's copy starts at ``select(t, 0, r)`` of tensors laid out by x's rows (x itself,
the leaf indices of a batched descent) and ends where its value is written into, stacked or
concatenated with the other rows' values. The fastfeedforward package's eval forward descends
batched (one ``>=`` per level over all rows) and then loops over the rows for the leaves (a
``.item()`` leaf index selects ``w1s``/``b1s``/``w2s``); a hand-written loop repeats the whole
descent per row.

``row_program(cut)`` labels every node of the cut-out by the rows its value reads:
- a *row taker* ``select(t, 0, r)`` / ``t[r]`` with t laid out by x's rows and read by no single
  row reads row r;
- ``copy(dst, src)`` reads what src reads (dst only gives the shape);
- a write into a buffer (select_scatter, slice_scatter, index_put), a stack or a cat reading
  more than one row, and anything reading such a node, reads all rows (a combiner);
- otherwise the union of its inputs'.
Nodes reading exactly one row form the row blocks; the k-th node of every block is one logical
node with B copies (the blocks must have the same op sequence). ``RowProgram`` then runs the
cut-out with an override of a logical node applied to each copy with its own row's value, and
reads a logical node as the B copies stacked: to the extractors it is a cut-out whose per-row
nodes are laid out by rows. That all copies compute one function with shared weights is not
assumed: the spec read off (from all rows at once) must reproduce every row on probe inputs.

Must not fire on: a loop whose rows do different things (blocks of different op sequences),
or rows that read other rows (no block structure): ``row_program`` returns the reason.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import fx

from .graph_canonical import hint_shape
from .graph_cutout import Cutout

_COMBINERS = {"select_scatter", "slice_scatter", "index_put", "stack", "cat", "concat", "index_copy", "scatter"}
_ALL = -1


class RowProgram:
    """A cut-out over a static batch of B rows whose per-row nodes are B copies of one program."""

    def __init__(self, cut: Cutout, rows: int, copies: dict, nodes: list):
        self.cut, self.facts, self.constants = cut, cut.facts, cut.constants
        self.x, self.y, self.rows = cut.x, cut.y, rows
        self.copies = copies                     # representative (row 0's copy) -> [copy for row r]
        self.nodes = nodes                       # row 0's blocks and the shared nodes, in graph order
        self.constant_nodes = cut.constant_nodes

    def features(self, node: fx.Node) -> Optional[tuple[int, ...]]:
        if node in self.copies:
            return hint_shape(node)
        return self.cut.features(node)

    def layout(self, node):
        return self.cut.layout(node)

    def batch_symbolic(self) -> bool:
        return False

    def run_rows(self, X: torch.Tensor, overrides: Optional[dict] = None, want: Optional[list] = None, **kwargs):
        """As ``Cutout.run_rows``: B probe rows per run, each row's copies given that row's values."""
        overrides = overrides or {}
        nodes = [self.y] if want is None else list(want)
        cut, B = self.cut, self.rows
        shape = tuple(hint_shape(self.x))
        outs = []
        for start in range(0, X.shape[0], B):
            chunk = X[start:start + B]
            R = chunk.shape[0]

            def pad(t):
                return t if R == B else torch.cat([t, t[:1].expand(B - R, *t.shape[1:])])

            x = pad(chunk).reshape(shape)
            local = {}
            for n, v in overrides.items():
                v = pad(v[start:start + B])
                if n in self.copies:
                    for r, copy in enumerate(self.copies[n]):
                        local[copy] = v[r].reshape(hint_shape(copy))
                else:
                    local[n] = cut._laid_out(n, v, shape[:-1])
            asked = [c for n in nodes for c in (self.copies[n] if n in self.copies else [n])]
            values = dict(zip(asked, cut.run(x, overrides=local, want=asked, **kwargs)))
            got = []
            for n in nodes:
                if n in self.copies:
                    got.append(torch.stack([values[c].reshape(-1) for c in self.copies[n]])[:R])
                else:
                    got.append(cut._read(n, values[n], B)[:R])
            outs.append(got)
        result = [torch.cat([o[i] for o in outs]) for i in range(len(nodes))]
        return result[0] if want is None else result


def _row_index(facts, cut: Cutout, n: fx.Node, rows: int) -> Optional[int]:
    """r for a row taker select(t, 0, r) / t[r] of a tensor t holding the rows in its first dim."""
    name = facts.name[n]
    if name != "select" or len(n.args) < 3 or n.args[1] not in (0, -len(hint_shape(n.args[0]) or ())) \
            or not isinstance(n.args[2], int):
        return None
    t = n.args[0]
    if not facts.depends.get(t):
        return None                  # a row of a buffer (torch.empty) to be written: not a row of the data
    shape = hint_shape(t)
    if not shape or shape[0] != rows:
        return None
    return n.args[2] % rows


def row_program(cut: Cutout) -> Union[RowProgram, str]:
    facts = cut.facts
    x_shape = hint_shape(cut.x)
    if not x_shape:
        return "the input's shape was not recorded"
    B = math.prod(x_shape[:-1])
    if B < 2:
        return "one row: nothing to tell a per-row loop from a batched tree"
    reads: dict[fx.Node, frozenset] = {cut.x: frozenset()}
    everything = frozenset([_ALL])
    inside = set(cut.nodes) | {cut.x}
    for n in cut.nodes:
        ins = [i for i in n.all_input_nodes if i in reads]
        name = facts.name[n]
        if name == "copy" and len(n.args) >= 2 and isinstance(n.args[1], fx.Node):
            got = reads.get(n.args[1], frozenset())
        else:
            got = frozenset().union(*(reads[i] for i in ins)) if ins else frozenset()
        if _ALL in got:
            got = everything
        elif not got and (r := _row_index(facts, cut, n, B)) is not None and n.args[0] in inside:
            got = frozenset([r])
        elif name in _COMBINERS and (len(got) > 1 or (got and _holds_rows(n, B))):
            got = everything
        elif len(got) > 1:
            got = everything
        reads[n] = got
    blocks: dict[int, list] = {}
    for n in cut.nodes:
        if len(reads[n]) == 1 and _ALL not in reads[n]:
            blocks.setdefault(next(iter(reads[n])), []).append(n)
    if sorted(blocks) != list(range(B)):
        return f"not a loop over the example's {B} rows ({len(blocks)} per-row block(s))"
    first = [facts.name[n] for n in blocks[0]]
    for r in range(1, B):
        if [facts.name[n] for n in blocks[r]] != first:
            return f"the per-row blocks of rows 0 and {r} are not the same program"
    copies = {blocks[0][k]: [blocks[r][k] for r in range(B)] for k in range(len(first))}
    others = {n for r in range(1, B) for n in blocks[r]}
    nodes = [n for n in cut.nodes if n not in others]
    return RowProgram(cut, B, copies, nodes)


def _holds_rows(n: fx.Node, rows: int) -> bool:
    shape = hint_shape(n)
    return bool(shape) and shape[0] == rows
