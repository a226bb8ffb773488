"""softmax microkernels: one tile-row block of the (causally masked) row softmax and of its backward. The SQL
side (llm_softmax_causal, llm_softmax_causal_backward: checks, array_agg per tile row, unnest) is
py/ops/softmax.py."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import F32, hstack


def softmax_block(s_tiles: Sequence[bytes], rows: int, cols: int, first_row: int, seq_len: int, scale: float,
                  causal: bool) -> list[bytes]:
    """One tile-row block of S (rows x cols, tiles ordered by column) -> the tiles of softmax(scale * S)."""
    z = hstack(s_tiles, rows) * np.float32(scale)
    if z.shape[1] != cols:
        error('pg_llm: softmax_causal: a tile-row block has %d columns, expected %d (missing tiles?)'
              % (z.shape[1], cols))
    if causal:
        q = (first_row + np.arange(rows)) % seq_len
        z[np.arange(cols)[None, :] > q[:, None]] = -np.inf
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True, dtype=np.float64).astype(F32)
    out, c0 = [], 0
    for t in s_tiles:
        w = len(t) // (4 * rows)
        out.append(z[:, c0:c0 + w].tobytes())
        c0 += w
    return out


def softmax_backward_block(p_tiles: Sequence[bytes], dp_tiles: Sequence[bytes], rows: int, cols: int,
                           scale: float) -> list[bytes]:
    """One tile-row block of P and dP -> the tiles of dS = P * (dP - rowsum(dP * P)) * scale."""
    p = hstack(p_tiles, rows)
    dp = hstack(dp_tiles, rows)
    if p.shape[1] != cols or dp.shape[1] != cols:
        error('pg_llm: softmax_causal_backward: a tile-row block of p or dp has %d/%d columns, expected %d'
              ' (missing tiles?)' % (p.shape[1], dp.shape[1], cols))
    dot = (dp * p).sum(axis=1, keepdims=True, dtype=np.float64).astype(F32)
    ds = p * (dp - dot) * np.float32(scale)
    out, c0 = [], 0
    for t in p_tiles:
        w = len(t) // (4 * rows)
        out.append(ds[:, c0:c0 + w].tobytes())
        c0 += w
    return out
