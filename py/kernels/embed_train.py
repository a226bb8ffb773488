"""The fused GPT-2 input for training (the SQL side: py/ops/gpt2_embed.py): x = dropout(wte[tokens] + wpe[positions])
in one call, and its backward, which scatter-adds the gradient into wte's and wpe's rows in one more. The chain of
per-op kernels stored the two gathers, their sum and the dropout's output (4 x N x C floats) and rewrote wte's
gradient: the head's part was written first, then read and written again with the embedding's part added (a second
154 MB version of it, at GPT-2 small, that PostgreSQL cannot reuse before the step commits).

So the LM head's gradient of the tied wte waits in the backend's memory for the embedding's part: the fused head
(head_train.head_kernel with a tape) keeps it as the tape's pending gradient of that tensor (held.py), and this
backward adds it in, so wte's gradient is made once (and held, when the tape holds its gradients). A pending
gradient nobody took (an untied head) is made by llm_head_nll_flush at the end of the backward.

Numerics as the chain: the sum and the residual dropout mask in float32 per tile of x (dropout_rows), the scatter-add
in float64 in token order then float32, added to the head's part.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.dropout import dropout_rows
from pg_llm.kernels.held import emit_grad, take_pending
from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import block, cut, whole
from pg_llm.kernels.weight_cache import cache_budget, cached_tensors


def _weights(plpy: Any, GD: dict, wte: int, wpe: int, op: str) -> tuple[np.ndarray, np.ndarray]:
    te, pe = cached_tensors(plpy, GD, [wte, wpe], block, cache_budget(plpy, GD))
    if te.shape[1] != pe.shape[1]:
        error('pg_llm: %s: wte %s and wpe %s have different widths' % (op, te.shape, pe.shape))
    return te, pe


def _positions(n: int, seq_len: int, wpe_rows: int, op: str) -> np.ndarray:
    if seq_len < 1 or n % seq_len or seq_len > wpe_rows:
        error('pg_llm: %s: %d tokens are not sequences of %d positions (wpe has %d)' % (op, n, seq_len, wpe_rows))
    return np.arange(n, dtype=np.int64) % seq_len


def _ids(tokens: Sequence[int], vocab: int, op: str) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.int64)
    if t.size and (t.min() < 0 or t.max() >= vocab):
        error('pg_llm: %s: a token id is outside the vocabulary of %d' % (op, vocab))
    return t


def forward_kernel(plpy: Any, GD: dict, wte: int, wpe: int, tokens: Sequence[int], seq_len: int, rate: float,
                   seed: int, tile: Sequence[int], drop: Sequence[int]) -> list[bytes]:
    """llm_mk_gpt2_embed: x's tiles (tiling `tile`, (tr, tc) order), wte and wpe from the weight cache; drop = [the
    masks' tile rows, x's first row in the whole batch] (dropout_rows)."""
    te, pe = _weights(plpy, GD, wte, wpe, 'gpt2_embed')
    t = _ids(tokens, te.shape[0], 'gpt2_embed')
    x = te[t] + pe[_positions(len(t), seq_len, pe.shape[0], 'gpt2_embed')]
    if rate > 0:
        x = dropout_rows(x, rate, seed, drop[0], tile[1], drop[1])
    return [d for _, _, d in cut(x, *tile)]


def _scatter(rows: np.ndarray, d: np.ndarray, out: np.ndarray) -> None:
    """out[rows[i]] += d[i]: summed in float64 in the order of i (repeated rows accumulate), then float32."""
    u, inv = np.unique(rows, return_inverse=True)
    acc = np.zeros((len(u), d.shape[1]), dtype=np.float64)
    np.add.at(acc, inv, d)
    out[u] += acc.astype(np.float32)


def backward_kernel(plpy: Any, GD: dict, dy_tiles: Sequence[bytes], geom: Sequence[int], wte: int, wpe: int,
                    tokens: Sequence[int], seq_len: int, rate: float, seed: int, drop: Sequence[int], tape: int,
                    grad_tiles: Sequence[int], grad_ids: Sequence[int]) -> Iterator[tuple[int, int, int, bytes]]:
    """llm_mk_gpt2_embed_backward: (k, tr, tc, data) rows, k = 0 wte's gradient (with tape's pending gradient of
    wte: the tied head's), k = 1 wpe's, cut in grad_tiles[0:2] and grad_tiles[2:4]; none when the tape holds its
    gradients (held.py: kept under grad_ids)."""
    rows, cols, th, tw = geom
    d = whole(dy_tiles, rows, cols, th, tw, 'gpt2_embed_backward')
    if rate > 0:
        d = dropout_rows(d, rate, seed, drop[0], tw, drop[1])
    te, pe = _weights(plpy, GD, wte, wpe, 'gpt2_embed_backward')
    t = _ids(tokens, te.shape[0], 'gpt2_embed_backward')
    if len(t) != rows or te.shape[1] != cols:
        error('pg_llm: gpt2_embed_backward: dy (%d, %d) does not fit %d tokens of wte %s'
              % (rows, cols, len(t), te.shape))
    head = take_pending(GD, tape, wte)
    dte = np.zeros_like(te) if head is None else head
    _scatter(t, d, dte)
    dpe = np.zeros_like(pe)
    _scatter(_positions(rows, seq_len, pe.shape[0], 'gpt2_embed_backward'), d, dpe)
    for k, g in enumerate((dte, dpe)):
        yield from emit_grad(GD, tape, grad_ids[k], g, k, grad_tiles[2 * k], grad_tiles[2 * k + 1])
