"""nll microkernel: per-row NLL (float64) of some rows of one tile-row block of logits, 32 rows at a time.
The SQL side (which blocks hold scored rows, their targets, the result in row order) is py/ops/nll.py
(sql/kernels/nll.sql)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import hstack


def nll_rows(tiles: Sequence[bytes], rows: int, cols: int, skip: int, targets: Sequence[int]) -> list[float]:
    """NLL of rows skip .. skip+len(targets)-1 of one tile-row block (rows x cols, tiles ordered by column)."""
    x = hstack(tiles, rows)
    if x.shape[1] != cols:
        error('pg_llm: nll: a tile-row block has %d columns, expected %d (missing tiles?)'
              % (x.shape[1], cols))
    t = np.asarray(targets, dtype=np.int64)
    out: list[float] = []
    for r0 in range(0, len(t), 32):
        z = x[skip + r0:skip + min(r0 + 32, len(t))].astype(np.float64)
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        out.extend((lse - z[np.arange(z.shape[0]), t[r0:r0 + 32]]).tolist())
    return out
