"""torch's intra-op thread count set for a block and restored after it (kernel tests at 1 and 2 threads)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


@contextlib.contextmanager
def num_threads(n: Optional[int] = None):
    """Within the block: ``n`` threads (None: as now; the block may change it). Restored on exit."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
