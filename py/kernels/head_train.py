"""Fused LM head + cross-entropy for training (the SQL side: py/ops/head_nll.py): the mean NLL of targets under
logits = x @ head^T, and its gradients dx and dhead, computed HEAD_ROWS rows at a time, so the B*T x vocab logits
and their gradient are never stored (the kernel chain wrote both as tiles: 2 x 412 MB at 2 x 1024 tokens).

Per chunk: z = x_c @ head^T (float32), the log-sum-exp with the exponentials in float32 and the sums in float64
(score.nll_exp, the scoring path's), dz = (softmax(z) - onehot(target)) * scale, dx_c = dz @ head, dhead += dz^T @ x_c.

With ln_f's parameters, x is the last block's output: the kernel applies ln_f first and returns dx through it and
ln_f's gradients too (neither ln_f's output nor its gradient is stored).

With a tape, dhead is not written but kept as the tape's pending gradient of the head (embed_train.keep_pending): the
tied wte's embedding backward adds its part to it and makes wte's gradient once; flush_kernel makes one no op took.
When the tape holds its gradients (held.py), ln_f's and a flushed head gradient are held instead of written.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.held import emit_grad, keep_pending, take_pending
from pg_llm.kernels.layernorm import layernorm_backward_rows, layernorm_rows
from pg_llm.kernels.runtime import error
from pg_llm.kernels.score import nll_exp
from pg_llm.kernels.tiles import block, cut, whole
from pg_llm.kernels.weight_cache import cache_budget, cached_tensors

# rows of logits at a time: 1024 x 50257 floats = 206 MB; 256 rows took 4.2-5.1 s for 2,048 rows at GPT-2
# small, 1024 rows 3.4-3.7 s (each chunk adds its (V, C) head gradient: a 154 MB temporary and a pass)
HEAD_ROWS = 1024


def head_nll(x: np.ndarray, head: np.ndarray, targets: np.ndarray,
             scale: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(sum of the rows' NLL (float64), dx, dhead) for rows x (N, C), head (V, C), targets (N,): the gradients
    of scale * sum(NLL)."""
    total = 0.0
    dx = np.empty_like(x)
    dh = np.zeros_like(head)
    for r0 in range(0, x.shape[0], HEAD_ROWS):
        xc, t = x[r0:r0 + HEAD_ROWS], targets[r0:r0 + HEAD_ROWS]
        z = np.matmul(xc, head.T)
        per, s = nll_exp(z, t)  # z is now exp(z - rowmax)
        total += float(per.sum())
        z *= (scale / s).astype(np.float32)[:, None]  # softmax * scale
        z[np.arange(z.shape[0]), t] -= np.float32(scale)
        dx[r0:r0 + HEAD_ROWS] = np.matmul(z, head)
        dh += np.matmul(z.T, xc)
    return total, dx, dh


def head_kernel(plpy: Any, GD: dict, tiles: Sequence[bytes], geom: Sequence[int], head_id: int,
                targets: Sequence[int], scale: float, head_tile: Sequence[int], tape: int, ln: Sequence[int],
                eps: float, ln_tiles: Sequence[int], ln_ids: Sequence[int]) -> Iterator[tuple]:
    """llm_mk_head_nll: (k, tr, tc, data, nll) rows: k = 0 one row with the NLL sum, k = 1 dx's tiles (x's tiling
    geom = [rows, cols, tile rows, tile cols]), k = 2 dhead's tiles (tiles head_tile), for scale * sum(NLL); with
    tape (not 0) dhead is kept as the tape's pending gradient of the head instead. ln: [] or ln_f's (weight, bias)
    ids, applied to x first (eps), their gradients as k = 3 and 4 (tiles ln_tiles[0:2], ln_tiles[2:4]), or held
    under ln_ids."""
    rows, cols, th, tw = geom
    x = whole(tiles, rows, cols, th, tw, 'head_nll')
    head = cached_tensors(plpy, GD, [head_id], block, cache_budget(plpy, GD))[0]
    t = np.asarray(targets, dtype=np.int64)
    if head.shape[1] != cols or len(t) != rows:
        error('pg_llm: head_nll: x (%d, %d), head %s and %d targets do not fit' % (rows, cols, head.shape, len(t)))
    if len(t) and (t.min() < 0 or t.max() >= head.shape[0]):
        error('pg_llm: head_nll: a target id is outside the vocabulary of %d' % head.shape[0])
    if len(ln) not in (0, 2) or len(ln_tiles) != 2 * len(ln):
        error('pg_llm: head_nll: ln must be [] or ln_f\'s two ids (with their tiles), got %d' % len(ln))
    lnw = cached_tensors(plpy, GD, list(ln), block, cache_budget(plpy, GD)) if ln else []
    if any(w.size != cols for w in lnw):
        error('pg_llm: head_nll: ln_f\'s parameters have %s values, x rows %d' % ([w.size for w in lnw], cols))
    total, dx, dh = head_nll(layernorm_rows(x, *lnw, eps) if ln else x, head, t, scale)
    yield 0, 0, 0, None, total
    if ln:
        dx, dg, db = layernorm_backward_rows(x, dx, lnw[0], eps)
        for k, g in ((3, dg), (4, db)):
            lh, lw = ln_tiles[2 * k - 6], ln_tiles[2 * k - 5]
            for row in emit_grad(GD, tape, ln_ids[k - 3], g.reshape(1, -1), k, lh, lw):
                yield (*row, None)
    if tape:
        keep_pending(GD, tape, head_id, dh)
    for k, a, (h, w) in [(1, dx, (th, tw))] + ([] if tape else [(2, dh, tuple(head_tile))]):
        for tr, tc, data in cut(a, h, w):
            yield k, tr, tc, data, None


def flush_kernel(GD: dict, tape: int, head_id: int, head_tile: Sequence[int],
                 grad_id: int) -> Iterator[tuple[int, int, int]]:
    """llm_mk_head_nll_flush: (n, tr, tc, data) rows of the tape's pending gradient of the head, made tensor grad_id:
    n = 1 and its tiles, or one row n = 1 without data when the tape holds it; none when an op took it (the tied
    wte's embedding backward)."""
    g = take_pending(GD, tape, head_id)
    if g is None:
        return
    rows = emit_grad(GD, tape, grad_id, g, 1, head_tile[0], head_tile[1])
    yield from ((1, tr, tc, data) for _, tr, tc, data in rows) if rows else [(1, 0, 0, None)]
