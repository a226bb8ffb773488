"""cross_entropy microkernels: the NLL sum and the dlogits tiles of one tile-row block of logits, in float64,
32 rows at a time. The SQL side (grouping tiles by tile row, slicing targets, the mean) is
py/ops/cross_entropy.py (sql/kernels/cross_entropy.sql)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import hstack, payload


def cross_entropy_block(tiles: Sequence[bytes], targets: Sequence[int], rows: int, cols: int) -> float:
    """Sum over the rows of one tile-row block of logsumexp(row) - row[target], in float64."""
    x = hstack(tiles, rows)
    if x.shape[1] != cols:
        error('pg_llm: cross_entropy: a tile-row block has %d columns, expected %d (missing tiles?)'
              % (x.shape[1], cols))
    t = np.asarray(targets, dtype=np.int64)
    total = 0.0  # float64 chunks of 32 rows bound the temporaries (32 x 50257 x 8 bytes = 13 MB)
    for r0 in range(0, rows, 32):
        z = x[r0:r0 + 32].astype(np.float64)
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        total += float((lse - z[np.arange(z.shape[0]), t[r0:r0 + 32]]).sum())
    return total


def cross_entropy_backward_block(tiles: Sequence[bytes], targets: Sequence[int], rows: int, cols: int,
                                 scale: float) -> list[bytes]:
    """dlogits tiles of one tile-row block: (softmax(row) - onehot(target)) * scale, in float64."""
    x = hstack(tiles, rows)
    if x.shape[1] != cols:
        error('pg_llm: cross_entropy_backward: a tile-row block has %d columns, expected %d'
              ' (missing tiles?)' % (x.shape[1], cols))
    t = np.asarray(targets, dtype=np.int64)
    d = np.empty(x.shape, dtype=np.float32)
    for r0 in range(0, rows, 32):
        z = x[r0:r0 + 32].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        z[np.arange(z.shape[0]), t[r0:r0 + 32]] -= 1.0
        d[r0:r0 + 32] = z * scale
    out, c0 = [], 0
    for tile in tiles:
        w = len(tile) // (4 * rows)
        out.append(payload(d[:, c0:c0 + w]))
        c0 += w
    return out
