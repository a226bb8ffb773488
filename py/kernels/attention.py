"""attention microkernels: GPT-2's causal multi-head self-attention of one whole qkv matrix, forward and
backward (recomputing the probabilities), with optional dropout on the probabilities; float32 throughout, in
place where numpy allows (the backward in float64 took 2-4x longer for differences far under the tests'
tolerance). The SQL side (checks, gathering every tile, writing y / dqkv) is py/ops/attention.py."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.tiles import payload, whole


def _heads(qkv: np.ndarray, n_head: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = qkv.shape
    C = cols // 3
    x = qkv.reshape(rows // seq_len, seq_len, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    return x[0], x[1], x[2]


def _probs(q: np.ndarray, k: np.ndarray, seq_len: int) -> np.ndarray:
    """softmax(q k^T / sqrt(hd)) over the causal positions, float32, (B, H, T, T); the masked half is 0."""
    p = np.matmul(q, k.transpose(0, 1, 3, 2))
    p *= np.float32(1.0 / np.sqrt(q.shape[-1]))
    upper = np.triu(np.ones((seq_len, seq_len), dtype=bool), 1)
    p[..., upper] = -np.inf
    p -= p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def _keep(seed: int, shape: tuple[int, ...], rate: float) -> np.ndarray:
    """The dropout scale of the probabilities: keep / (1 - rate), float32, redrawn identically by the backward."""
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).random(shape, dtype=np.float32)
    return (u >= np.float32(rate)) * np.float32(1.0 / (1.0 - rate))


def attention_forward(tiles: Sequence[bytes], rows: int, cols: int, th: int, tw: int, n_head: int, seq_len: int,
                      rate: float, seed: int) -> list[bytes]:
    """y tiles (row-major tile order, tile th x min(tw, C)) of causal attention over qkv's tiles.
    rate > 0 applies inverted dropout to the probabilities with a mask drawn from `seed` (backward redraws it)."""
    q, k, v = _heads(whole(tiles, rows, cols, th, tw, 'attention'), n_head, seq_len)
    att = _probs(q, k, seq_len)
    if rate > 0:
        att *= _keep(seed, att.shape, rate)
    C = cols // 3
    y = np.matmul(att, v).transpose(0, 2, 1, 3).reshape(rows, C)
    otw = min(tw, C)
    return [payload(y[r:r + th, c:c + otw]) for r in range(0, rows, th) for c in range(0, C, otw)]


def attention_backward(tiles: Sequence[bytes], dy_tiles: Sequence[bytes], rows: int, cols: int, th: int, tw: int,
                       n_head: int, seq_len: int, rate: float, seed: int) -> list[bytes]:
    """dqkv tiles (qkv's tiling) given qkv's tiles and dy's tiles (tile th x min(tw, C)); the dropout mask
    of the forward is redrawn from the same seed."""
    C = cols // 3
    otw = min(tw, C)
    q, k, v = _heads(whole(tiles, rows, cols, th, tw, 'attention_backward'), n_head, seq_len)
    dyh = whole(dy_tiles, rows, C, th, otw, 'attention_backward').reshape(
        rows // seq_len, seq_len, n_head, C // n_head).transpose(0, 2, 1, 3)
    p = _probs(q, k, seq_len)
    dp = np.matmul(dyh, v.transpose(0, 1, 3, 2))
    if rate > 0:
        drop = _keep(seed, p.shape, rate)
        dv = np.matmul((p * drop).transpose(0, 1, 3, 2), dyh)
        dp *= drop
        del drop
    else:
        dv = np.matmul(p.transpose(0, 1, 3, 2), dyh)
    # ds = p * (dp - rowsum(dp * p)) / sqrt(hd), in dp's buffer
    dp -= (dp * p).sum(axis=-1, keepdims=True)
    dp *= p
    dp *= np.float32(1.0 / np.sqrt(q.shape[-1]))
    del p
    dq = np.matmul(dp, k)
    dk = np.matmul(dp.transpose(0, 1, 3, 2), q)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(rows, cols)
    return [payload(dqkv[r:r + th, c:c + tw]) for r in range(0, rows, th) for c in range(0, cols, tw)]
