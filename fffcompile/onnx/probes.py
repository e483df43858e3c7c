"""Probe inputs for a cut-out FFF subgraph, and reading tensors back as (rows, columns).

A region's input X has rank r >= 2 with the features last; probes of R rows are fed as
(R, d_in) for rank 2 and (1, ..., 1, R, d_in) above, so that every leading dim but one is 1
and the rows are whatever the region flattens. ``columns(array, rows)`` reads a value of the
region back as (R, k): the leading dims up to the one of size R are the rows, the rest the
columns of that value (k = 1 for a per-row scalar). A value that keeps the rows in a later
axis (a leaf-major (L, R, k) tensor, leaves run as one batched matmul over x expanded to
(L, R, d)) is told apart by evaluating it on R and R + 1 rows (``row_axes``: the one axis that
grows); ``columns`` and ``rows_as`` then move that axis first and back.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from ..errors import InvalidModelError


def x_layout(shape: Optional[list]) -> tuple[int, int]:
    """(rank, d_in) of a region input, or an error naming what is missing."""
    if shape is None or len(shape) < 2:
        raise InvalidModelError("the FFF input's rank is unknown or below 2")
    d_in = shape[-1]
    if not isinstance(d_in, int) or d_in < 1:
        raise InvalidModelError("the FFF input's feature width is not static")
    for d in shape[:-1]:
        if isinstance(d, int):
            raise InvalidModelError(f"the FFF input has a static leading dim ({d}); export with dynamic batch/sequence dims")
    return len(shape), d_in


def shaped(rows: np.ndarray, rank: int) -> np.ndarray:
    """(R, d) rows as a rank-``rank`` input: (1, ..., 1, R, d)."""
    return rows.reshape((1,) * (rank - 2) + rows.shape)


def probe_shapes(rank: int, d_in: int) -> list[tuple[int, ...]]:
    """Two input shapes for confirmation, with leading dims unlike the ones exporters trace with."""
    if rank == 2:
        return [(5, d_in), (23, d_in)]
    return [(1,) * (rank - 3) + (2, 3, d_in), (1,) * (rank - 3) + (3, 7, d_in)]


def columns(array: np.ndarray, rows: int, axis: Optional[int] = None) -> np.ndarray:
    """(R, k) view of a value computed from R probe rows (rows in ``axis`` when given, see ``row_axes``)."""
    array = np.asarray(array)
    if axis is not None:
        return np.moveaxis(array, axis, 0).reshape(rows, -1)
    size = 1
    for axis, dim in enumerate(array.shape):
        size *= dim
        if size == rows:
            return array.reshape(rows, -1)
        if size > rows:
            break
    raise InvalidModelError(f"a value of shape {array.shape} does not keep the {rows} probe rows apart")


def row_axes(small: Mapping[str, np.ndarray], large: Mapping[str, np.ndarray]) -> dict[str, int]:
    """For values evaluated on R and on R + 1 probe rows: {name: the rows axis} of every value whose rows are
    not its leading dims (exactly one axis grew by one, and a dim above 1 comes before it)."""
    axes = {}
    for name, a in small.items():
        b = large.get(name)
        if b is None or np.ndim(a) != np.ndim(b):
            continue
        grown = [k for k, (m, n) in enumerate(zip(np.shape(a), np.shape(b))) if m != n]
        if len(grown) == 1 and np.shape(b)[grown[0]] == np.shape(a)[grown[0]] + 1 \
                and any(d != 1 for d in np.shape(a)[:grown[0]]):
            axes[name] = grown[0]
    return axes


def rows_as(values: np.ndarray, like_shape: tuple[int, ...], like_rows: int, axis: Optional[int] = None) -> np.ndarray:
    """(R, k) rows laid out like a value of shape ``like_shape`` for ``like_rows`` rows (rows in ``axis`` if given)."""
    rows = values.shape[0]
    if axis is None:
        return values.reshape(feed_shape(like_shape, like_rows, rows))
    rest = tuple(like_shape[:axis]) + tuple(like_shape[axis + 1:])
    return np.moveaxis(values.reshape((rows,) + rest), 0, axis)


def feed_shape(like_shape: tuple[int, ...], like_rows: int, rows: int) -> tuple[int, ...]:
    """The shape of a value for ``rows`` probe rows, given its shape ``like_shape`` for ``like_rows`` rows."""
    size = 1
    for axis, dim in enumerate(like_shape):
        size *= dim
        if size == like_rows:
            return (1,) * axis + (rows,) + tuple(like_shape[axis + 1:])
    raise InvalidModelError(f"shape {like_shape} does not keep the {like_rows} probe rows apart")
