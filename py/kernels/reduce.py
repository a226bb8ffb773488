"""reduce microkernels: the partial row / column sum of one tile (float64 inside) and the broadcast back to a
tile. The SQL side (llm_sum_rows, llm_sum_cols and their backward) is py/ops/reduce.py."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats


def sum_tile(data: bytes, n: int, axis: int) -> bytes:
    """Partial sum of one tile along `axis`, accumulated in float64 -> n float32 values.
    axis 0: a tile (h, n) summed over its rows; axis 1: a tile (n, w) summed over its columns."""
    x = floats(data)
    if n <= 0 or x.size % n:
        error('pg_llm: sum: a tile of %d floats is not whole %s of %d'
              % (x.size, 'rows' if axis == 0 else 'columns', n))
    x = x.reshape(-1, n) if axis == 0 else x.reshape(n, -1)
    return x.sum(axis=axis, dtype=np.float64).astype('<f4').tobytes()


def broadcast_tile(v: bytes, h: int, w: int, axis: int) -> bytes:
    """One (h, w) tile broadcast from a vector tile: axis 0 repeats a row of w floats over h rows, axis 1 repeats
    a column of h floats over w columns."""
    x = floats(v)
    want = w if axis == 0 else h
    if x.size != want:
        error('pg_llm: sum backward: a gradient tile of %d floats, expected %d' % (x.size, want))
    return np.broadcast_to(x.reshape((1, w) if axis == 0 else (h, 1)), (h, w)).tobytes()
