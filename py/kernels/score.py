"""Fused inference forwards (the SQL side: py/ops/score.py): GPT-2 over whole token sequences in one PL/Python
call on the backend's cached weights, for llm_logits (some rows' logits) and for scoring (llm_perplexity,
llm_loss: the NLL sums of windows). Several windows (of one text, or of many texts) are packed into one forward:
their rows share every matmul, each attends only within itself, positions restart at 0 in each.

Why: the kernel chain writes every activation as tiles (scratch tensors, ~14 kernel calls a layer) and took
1.6-1.9x torch's time for a GPT-2 small forward; here the matmuls run on whole matrices, and the LM head runs in
row chunks, only on the rows that are needed, so B*T x vocab logits are never stored.

Same numbers as the chain: the float32 embedding add, gpt2_block (block_step.py), layernorm_rows, x @ head^T in
float32, and NLLs from a log-sum-exp of the float32 logits (exponentials in float32, sums in float64).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.attention_cache import attend
from pg_llm.kernels.block_step import gpt2_block
from pg_llm.kernels.decode import model_weights
from pg_llm.kernels.layernorm import layernorm_rows
from pg_llm.kernels.runtime import error

PACK_ROWS = 4096  # rows of one packed forward: bounds the activations (~60 KB a row for GPT-2 small)
HEAD_ROWS = 128  # rows of logits at a time: 128 x 50257 floats = 26 MB


def hidden(w: Sequence[np.ndarray], tokens: np.ndarray, spans: Sequence[tuple[int, int]], n_head: int,
           eps: float) -> np.ndarray:
    """ln_f(final hidden states) (N, C) of the packed sequences tokens[s:e] for (s, e) in spans (covering
    tokens in order), each on its own from position 0."""
    n_layer = (len(w) - 5) // 12
    pos = np.concatenate([np.arange(e - s) for s, e in spans])
    x = w[0][tokens] + w[1][pos]
    C = x.shape[1]

    def attn(qkv: np.ndarray) -> np.ndarray:
        y = np.empty((qkv.shape[0], C), dtype=np.float32)
        for s, e in spans:
            y[s:e] = attend(qkv[s:e, :C], qkv[s:e, C:], 0, n_head)
        return y
    for layer in range(n_layer):
        x = gpt2_block(x, w[2 + 12 * layer:14 + 12 * layer], eps, attn)
    return layernorm_rows(x, w[-3], w[-2], eps)


def logits(w: Sequence[np.ndarray], h: np.ndarray) -> np.ndarray:
    """float32 logits of rows h: h @ head^T."""
    return np.matmul(h, w[-1].T)


def nll_exp(z: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-row NLL of targets, per-row sum of the exponentials) under float32 logits rows z, which are left as
    exp(z - rowmax): log-sum-exp with the exponentials in float32 and their sum and the result in float64
    (differs from llm_nll's all-float64 by ~1e-7). z / sum is the softmax (the training head's gradient)."""
    picked = z[np.arange(z.shape[0]), targets].astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    z -= m
    np.exp(z, out=z)
    s = z.sum(axis=1, dtype=np.float64)
    return m[:, 0].astype(np.float64) + np.log(s) - picked, s


def nll(z: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row NLL of targets under float32 logits rows z (overwritten): nll_exp's."""
    return nll_exp(z, targets)[0]


def window_nll(w: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, wins: Sequence[tuple[int, int, int]],
               n_head: int, eps: float) -> list[float]:
    """For each window (b, e, s) of the flat arrays x, y: the sum over i in [s, e) of the NLL of y[i] given
    x[b .. i] (one forward of x[b:e]). Windows are packed PACK_ROWS rows at a time."""
    out: list[float] = []
    k = 0
    while k < len(wins):
        group, rows = [wins[k]], wins[k][1] - wins[k][0]
        while k + len(group) < len(wins) and rows + wins[k + len(group)][1] - wins[k + len(group)][0] <= PACK_ROWS:
            nxt = wins[k + len(group)]
            group.append(nxt)
            rows += nxt[1] - nxt[0]
        k += len(group)
        spans, keep, tgt, off = [], [], [], 0
        for b, e, s in group:
            spans.append((off, off + e - b))
            keep.append(np.arange(off + s - b, off + e - b))
            tgt.append(y[s:e])
            off += e - b
        h = hidden(w, np.concatenate([x[b:e] for b, e, _ in group]), spans, n_head, eps)
        rows_h, t = h[np.concatenate(keep)], np.concatenate(tgt)
        per = np.concatenate([nll(logits(w, rows_h[r:r + HEAD_ROWS]), t[r:r + HEAD_ROWS])
                              for r in range(0, len(t), HEAD_ROWS)]) if len(t) else np.zeros(0)
        cut = np.cumsum([0] + [e - s for _, e, s in group])
        out.extend(float(per[cut[i]:cut[i + 1]].sum()) for i in range(len(group)))
    return out


def nll_kernel(plpy: Any, GD: dict, params: Sequence[int], x: Sequence[int], y: Sequence[int], wb: Sequence[int],
               we: Sequence[int], ws: Sequence[int], n_head: int, eps: float) -> list[float]:
    """llm_mk_gpt2_window_nll: window_nll on the model's cached weights (windows 0-based, half-open)."""
    xa, ya = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
    if len(xa) != len(ya) or not len(wb) == len(we) == len(ws):
        error('pg_llm: window_nll: %d tokens and %d targets, %d/%d/%d window bounds'
              % (len(xa), len(ya), len(wb), len(we), len(ws)))
    wins = list(zip(wb, we, ws, strict=True))
    for b, e, s in wins:
        if not 0 <= b <= s < e <= len(xa):
            error('pg_llm: window_nll: window (%d, %d) scoring from %d is not inside %d tokens' % (b, e, s, len(xa)))
    w = model_weights(plpy, GD, params)
    if len(xa) and (xa.min() < 0 or max(xa.max(), ya.max()) >= w[0].shape[0] or ya.min() < 0):
        error('pg_llm: window_nll: token ids outside the vocabulary of %d' % w[0].shape[0])
    if any(e - b > w[1].shape[0] for b, e, _ in wins):
        error('pg_llm: window_nll: a window is longer than the context of %d' % w[1].shape[0])
    return window_nll(w, xa, ya, wins, n_head, eps)


def logits_kernel(plpy: Any, GD: dict, params: Sequence[int], tokens: Sequence[int], first: int, n_head: int,
                  eps: float) -> bytes:
    """llm_mk_gpt2_logits: float32 logits of rows first .. n-1 of one sequence, row-major."""
    w = model_weights(plpy, GD, params)
    t = np.asarray(tokens, dtype=np.int64)
    if not 0 <= first < len(t) <= w[1].shape[0] or t.min() < 0 or t.max() >= w[0].shape[0]:
        error('pg_llm: gpt2_logits: rows from %d of %d tokens (context %d, vocabulary %d)'
              % (first, len(t), w[1].shape[0], w[0].shape[0]))
    h = hidden(w, t, [(0, len(t))], n_head, eps)[first:]
    return b''.join(logits(w, h[r:r + HEAD_ROWS]).astype('<f4').tobytes() for r in range(0, len(h), HEAD_ROWS))
