"""layernorm microkernels (the SQL side: py/ops/layernorm.py): whole rows of one tile-row block, normalized in
float64 (mean and rstd recomputed from x in the backward)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import F32, floats, hstack


def layernorm_rows(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Rows of x normalized in float64, scaled by g and shifted by b, as float32 (the layernorm of every path)."""
    x = x.astype(np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)
    return (xc * rstd * g.reshape(-1) + b.reshape(-1)).astype(F32)


def layernorm_backward_rows(x: np.ndarray, dy: np.ndarray, g: np.ndarray,
                            eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dg, db) of layernorm_rows for rows x and their gradient dy, in float64, returned as float32 (dg and db
    summed over these rows); mean and rstd recomputed from x."""
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)
    xhat = xc * rstd
    dxhat = dy * g.reshape(-1)
    dx = (rstd * (dxhat - dxhat.mean(axis=1, keepdims=True)
                  - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))).astype(F32)
    return dx, (dy * xhat).sum(axis=0).astype(F32), dy.sum(axis=0).astype(F32)


def layernorm_block(x_tiles: Sequence[bytes], g_row: bytes, b_row: bytes, rows: int, cols: int,
                    eps: float) -> list[bytes]:
    """One tile-row block (rows x cols, tiles ordered by column) normalized row-wise; returns its tiles."""
    x = hstack(x_tiles, rows)
    if x.shape[1] != cols:
        error('pg_llm: layernorm: a tile-row block has %d columns, expected %d (missing tiles?)' % (x.shape[1], cols))
    y = layernorm_rows(x, floats(g_row), floats(b_row), eps)
    out, c0 = [], 0
    for t in x_tiles:
        w = len(t) // (4 * rows)
        out.append(y[:, c0:c0 + w].tobytes())
        c0 += w
    return out


def layernorm_backward_block(x_tiles: Sequence[bytes], dy_tiles: Sequence[bytes], g_row: bytes, rows: int,
                             cols: int, eps: float) -> list[bytes]:
    """dx tiles of one tile-row block, then this block's partial dg tiles (1 x w), then its partial db tiles."""
    x = hstack(x_tiles, rows)
    dy = hstack(dy_tiles, rows)
    if x.shape[1] != cols or dy.shape[1] != cols:
        error('pg_llm: layernorm_backward: a tile-row block of x or dy has %d/%d columns, expected %d'
              ' (missing tiles?)' % (x.shape[1], dy.shape[1], cols))
    dx, dg, db = layernorm_backward_rows(x, dy, floats(g_row), eps)
    cuts, c0 = [], 0
    for t in x_tiles:
        cuts.append(slice(c0, c0 + len(t) // (4 * rows)))
        c0 = cuts[-1].stop
    return [dx[:, c].tobytes() for c in cuts] + [dg[c].tobytes() for c in cuts] + [db[c].tobytes() for c in cuts]
