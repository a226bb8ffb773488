"""attention microkernels: GPT-2's causal multi-head self-attention of one whole qkv matrix, forward and
backward (recomputing the probabilities block by block), with optional dropout on the probabilities; float32
throughout, in place where numpy allows (the backward in float64 took 2-4x longer for differences far under the
tests' tolerance). causal_attention / causal_attention_backward also serve the fused training block.
The SQL side (checks, gathering every tile, writing y / dqkv) is py/ops/attention.py."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.attention_cache import QUERY_BLOCK, causal_exp
from pg_llm.kernels.tiles import payload, whole


def keep_block(seed: int, b: int, r0: int, shape: tuple[int, ...], rate: float) -> np.ndarray:
    """The dropout scale (keep / (1 - rate), float32) of the probabilities of sequence b's query rows r0.. (all
    heads: shape (H, rows, keys)), from PCG64(SeedSequence([seed, b, r0])): 32 random bits per probability,
    kept when >= rate * 2^32; drawn only for the keys the block sees, redrawn identically by the backward."""
    n = int(np.prod(shape))
    bits = np.random.PCG64(np.random.SeedSequence([seed % 2**64, b, r0])).random_raw((n + 1) // 2)
    thr = np.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))
    keep = bits.view(np.uint32)[:n].reshape(shape) >= thr
    return keep * np.float32(1.0 / (1.0 - rate))


def _probs(q: np.ndarray, k: np.ndarray, r0: int, scale: np.float32) -> np.ndarray:
    """softmax(q k / sqrt(hd)) of query rows r0.. (q: (H, r, hd)) over keys 0 .. r0 + r - 1 (k: (H, hd, keys)),
    float32 (H, r, keys); the masked (future) entries are exactly 0."""
    p = causal_exp(q, k, r0, scale)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def _split(s: np.ndarray, n_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q (H, T, hd), k (H, hd, T), v (H, T, hd) of one sequence's qkv rows (T, 3C)."""
    T, C = s.shape[0], s.shape[1] // 3
    h = s.reshape(T, 3, n_head, C // n_head)
    return h[:, 0].transpose(1, 0, 2), h[:, 1].transpose(1, 2, 0), h[:, 2].transpose(1, 0, 2)


def causal_attention(qkv: np.ndarray, n_head: int, seq_len: int, rate: float, seed: int, b0: int = 0) -> np.ndarray:
    """y (N, C) of causal multi-head attention over qkv (N, 3C) = sequences of seq_len rows, float32: query blocks
    of QUERY_BLOCK rows never touch the keys after their last row; (B, H, T, T) is never formed. rate > 0:
    inverted dropout on the probabilities (keep_block), the sequences numbered from b0 (a rank's share of a
    batch: its first sequence's index in the whole batch)."""
    N, C = qkv.shape[0], qkv.shape[1] // 3
    y = np.empty((N, C), dtype=np.float32)
    scale = np.float32(1.0 / np.sqrt(C // n_head))
    for b in range(N // seq_len):
        q, k, v = _split(qkv[b * seq_len:(b + 1) * seq_len], n_head)
        for r0 in range(0, seq_len, QUERY_BLOCK):
            r1 = min(r0 + QUERY_BLOCK, seq_len)
            p = _probs(q[:, r0:r1], k[:, :, :r1], r0, scale)
            if rate > 0:
                p *= keep_block(seed, b0 + b, r0, p.shape, rate)
            y[b * seq_len + r0:b * seq_len + r1] = np.matmul(p, v[:, :r1]).transpose(1, 0, 2).reshape(r1 - r0, C)
    return y


def causal_attention_backward(qkv: np.ndarray, dy: np.ndarray, n_head: int, seq_len: int, rate: float,
                              seed: int, b0: int = 0) -> np.ndarray:
    """dqkv (N, 3C) of causal_attention given dy (N, C), recomputing each query block's probabilities (and its
    dropout mask) instead of storing them: FlashAttention's backward, block by block, in float32."""
    N, C = dy.shape
    H, hd = n_head, C // n_head
    dqkv = np.empty((N, 3 * C), dtype=np.float32)
    scale = np.float32(1.0 / np.sqrt(hd))
    for b in range(N // seq_len):
        rows = slice(b * seq_len, (b + 1) * seq_len)
        q, k, v = _split(qkv[rows], n_head)
        g_all = dy[rows].reshape(seq_len, H, hd).transpose(1, 0, 2)
        dq = np.empty((H, seq_len, hd), dtype=np.float32)
        dk = np.zeros((H, seq_len, hd), dtype=np.float32)
        dv = np.zeros((H, seq_len, hd), dtype=np.float32)
        for r0 in range(0, seq_len, QUERY_BLOCK):
            r1 = min(r0 + QUERY_BLOCK, seq_len)
            p = _probs(q[:, r0:r1], k[:, :, :r1], r0, scale)
            g = g_all[:, r0:r1]
            dp = np.matmul(g, v[:, :r1].transpose(0, 2, 1))  # (H, r, keys)
            if rate > 0:
                keep = keep_block(seed, b0 + b, r0, p.shape, rate)
                dv[:, :r1] += np.matmul((p * keep).transpose(0, 2, 1), g)
                dp *= keep
                del keep
            else:
                dv[:, :r1] += np.matmul(p.transpose(0, 2, 1), g)
            dp -= (dp * p).sum(axis=-1, keepdims=True)  # ds = p * (dp - rowsum(dp * p)) / sqrt(hd)
            dp *= p
            dp *= scale
            dq[:, r0:r1] = np.matmul(dp, k[:, :, :r1].transpose(0, 2, 1))
            dk[:, :r1] += np.matmul(dp.transpose(0, 2, 1), q[:, r0:r1])
        out = dqkv[rows].reshape(seq_len, 3, H, hd)
        out[:, 0], out[:, 1], out[:, 2] = dq.transpose(1, 0, 2), dk.transpose(1, 0, 2), dv.transpose(1, 0, 2)
    return dqkv


def attention_forward(tiles: Sequence[bytes], rows: int, cols: int, th: int, tw: int, n_head: int, seq_len: int,
                      rate: float, seed: int) -> list[bytes]:
    """y tiles (row-major tile order, tile th x min(tw, C)) of causal attention over qkv's tiles.
    rate > 0 applies inverted dropout to the probabilities with masks drawn from `seed` (backward redraws them)."""
    y = causal_attention(whole(tiles, rows, cols, th, tw, 'attention'), n_head, seq_len, rate, seed)
    C = cols // 3
    otw = min(tw, C)
    return [payload(y[r:r + th, c:c + otw]) for r in range(0, rows, th) for c in range(0, C, otw)]


def attention_backward(tiles: Sequence[bytes], dy_tiles: Sequence[bytes], rows: int, cols: int, th: int, tw: int,
                       n_head: int, seq_len: int, rate: float, seed: int) -> list[bytes]:
    """dqkv tiles (qkv's tiling) given qkv's tiles and dy's tiles (tile th x min(tw, C)); the dropout masks
    of the forward are redrawn from the same seed."""
    C = cols // 3
    qkv = whole(tiles, rows, cols, th, tw, 'attention_backward')
    dy = whole(dy_tiles, rows, C, th, min(tw, C), 'attention_backward')
    dqkv = causal_attention_backward(qkv, dy, n_head, seq_len, rate, seed)
    return [payload(dqkv[r:r + th, c:c + tw]) for r in range(0, rows, th) for c in range(0, cols, tw)]
