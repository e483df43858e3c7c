"""Probe inputs for a cut-out FFF subgraph, and reading tensors back as (rows, columns).

A region's input X has rank r >= 2 with the features last; probes of R rows are fed as
(R, d_in) for rank 2 and (1, ..., 1, R, d_in) above, so that every leading dim but one is 1
and the rows are whatever the region flattens. ``columns(array, rows)`` reads a value of the
region back as (R, k): the leading dims up to the one of size R are the rows, the rest the
columns of that value (k = 1 for a per-row scalar).
"""
from __future__ import annotations

from typing import Optional

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


def columns(array: np.ndarray, rows: int) -> np.ndarray:
    """(R, k) view of a value computed from R probe rows."""
    array = np.asarray(array)
    size = 1
    for axis, dim in enumerate(array.shape):
        size *= dim
        if size == rows:
            return array.reshape(rows, -1)
        if size > rows:
            break
    raise InvalidModelError(f"a value of shape {array.shape} does not keep the {rows} probe rows apart")


def feed_shape(like_shape: tuple[int, ...], like_rows: int, rows: int) -> tuple[int, ...]:
    """The shape of a value for ``rows`` probe rows, given its shape ``like_shape`` for ``like_rows`` rows."""
    size = 1
    for axis, dim in enumerate(like_shape):
        size *= dim
        if size == like_rows:
            return (1,) * axis + (rows,) + tuple(like_shape[axis + 1:])
    raise InvalidModelError(f"shape {like_shape} does not keep the {like_rows} probe rows apart")
