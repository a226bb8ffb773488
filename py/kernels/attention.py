"""attention microkernels: GPT-2's causal multi-head self-attention of one whole qkv matrix, forward (float32)
and backward (float64, recomputing the probabilities), with optional dropout on the probabilities. The SQL
side (checks, gathering every tile, writing y / dqkv) is py/ops/attention.py (sql/kernels/attention.sql)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.tiles import payload, whole


def attention_forward(tiles: Sequence[bytes], rows: int, cols: int, th: int, tw: int, n_head: int, seq_len: int,
                      rate: float, seed: int) -> list[bytes]:
    """y tiles (row-major tile order, tile th x min(tw, C)) of causal attention over qkv's tiles.
    rate > 0 applies inverted dropout to the probabilities with a mask drawn from `seed` (backward redraws it)."""
    qkv = whole(tiles, rows, cols, th, tw, 'attention')
    C = cols // 3
    hd = C // n_head
    B = rows // seq_len
    x = qkv.reshape(B, seq_len, 3, n_head, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    q, k, v = x[0], x[1], x[2]
    att = np.matmul(q, k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(hd))
    att = np.where(np.tril(np.ones((seq_len, seq_len), dtype=bool)), att, np.float32(-np.inf))
    att = np.exp(att - att.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    if rate > 0:
        keep = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).random(att.shape) >= rate
        att = att * keep * np.float32(1.0 / (1.0 - rate))
    y = np.matmul(att, v).transpose(0, 2, 1, 3).reshape(rows, C)
    otw = min(tw, C)
    return [payload(y[r:r + th, c:c + otw]) for r in range(0, rows, th) for c in range(0, C, otw)]


def attention_backward(tiles: Sequence[bytes], dy_tiles: Sequence[bytes], rows: int, cols: int, th: int, tw: int,
                       n_head: int, seq_len: int, rate: float, seed: int) -> list[bytes]:
    """dqkv tiles (qkv's tiling) given qkv's tiles and dy's tiles (tile th x min(tw, C)); the dropout mask
    of the forward is redrawn from the same seed."""
    C = cols // 3
    otw = min(tw, C)
    qkv = whole(tiles, rows, cols, th, tw, 'attention_backward').astype(np.float64)
    dy = whole(dy_tiles, rows, C, th, otw, 'attention_backward').astype(np.float64)
    hd = C // n_head
    B = rows // seq_len
    x = qkv.reshape(B, seq_len, 3, n_head, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = x[0], x[1], x[2]
    scale = 1.0 / np.sqrt(hd)
    s = np.matmul(q, k.transpose(0, 1, 3, 2)) * scale
    s = np.where(np.tril(np.ones((seq_len, seq_len), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dyh = dy.reshape(B, seq_len, n_head, hd).transpose(0, 2, 1, 3)
    drop: float | np.ndarray = 1.0
    if rate > 0:
        keep = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).random(p.shape) >= rate
        drop = keep / (1.0 - rate)
    dv = np.matmul((p * drop).transpose(0, 1, 3, 2), dyh)
    dp = np.matmul(dyh, v.transpose(0, 1, 3, 2)) * drop
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
    dq = np.matmul(ds, k)
    dk = np.matmul(ds.transpose(0, 1, 3, 2), q)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(rows, cols)
    return [payload(dqkv[r:r + th, c:c + tw]) for r in range(0, rows, th) for c in range(0, cols, tw)]
