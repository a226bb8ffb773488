"""attention_cached microkernel (the SQL side: py/ops/attention_cache.py): causal multi-head attention of new
positions against a key/value cache, for incremental decoding (and the fused block step)."""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import F32, floats, whole

QUERY_BLOCK = 256  # query rows at a time: a block attends only to the keys up to its last row


@functools.cache
def _future(r: int) -> np.ndarray:
    """(r, r) float32: -inf above the diagonal (a row's future keys), 0 elsewhere; read-only, made once per r."""
    m = np.triu(np.full((r, r), -np.inf, dtype=F32), 1)
    m.flags.writeable = False
    return m


def causal_exp(q: np.ndarray, k: np.ndarray, first: int, scale: np.float32) -> np.ndarray:
    """exp(q k * scale - rowmax), float32 (H, r, keys), of query rows at positions first .. first+r-1 (q: (H, r, hd))
    over the keys 0 .. first+r-1 (k: (H, hd, keys)); the future entries are exactly 0. Unnormalized: the
    softmax of attend (normalized after the product with v) and of causal_attention (before, for dropout)."""
    e = np.matmul(q, k)
    e *= scale
    r = q.shape[1]
    if r > 1:  # only the block's own keys can be in the future of one of its rows
        e[:, :, first:] += _future(r)  # x + 0 is x, x + -inf is -inf: a boolean-mask store took 4x as long
    e -= e.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    return e


def attend(q: np.ndarray, kvs: np.ndarray, past: int, n_head: int) -> np.ndarray:
    """Causal attention of n new rows q (n, C) at positions past .. past+n-1 over the cache kvs (past + n, 2C) of
    [k | v] rows, float32: y (n, C). Blocks of QUERY_BLOCK query rows never touch the keys after their last row
    (the masked half of a prefill is skipped), softmax in place, normalized after the product with v."""
    rows, C = q.shape
    hd = C // n_head
    total = past + rows
    qh = q.reshape(rows, n_head, hd).transpose(1, 0, 2)  # (H, n, hd)
    k = kvs[:, :C].reshape(total, n_head, hd).transpose(1, 2, 0)  # (H, hd, total)
    v = kvs[:, C:].reshape(total, n_head, hd).transpose(1, 0, 2)  # (H, total, hd)
    y = np.empty((rows, n_head, hd), dtype=np.float32)
    scale = np.float32(1.0 / np.sqrt(hd))
    for r0 in range(0, rows, QUERY_BLOCK):
        r1 = min(r0 + QUERY_BLOCK, rows)
        end = past + r1  # keys 0 .. end-1 are visible to some row of the block
        att = causal_exp(qh[:, r0:r1], k[:, :, :end], past + r0, scale)
        out = np.matmul(att, v[:, :end])  # (H, r, hd)
        out /= att.sum(axis=-1, keepdims=True)
        y[r0:r1] = out.transpose(1, 0, 2)
    return y.reshape(rows, C)


def attention_cached(tiles: Sequence[bytes], kv: bytes | np.ndarray, rows: int, cols: int, th: int, tw: int,
                     past: int, n_head: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(t, tr, tc, data): t = 0 for y's tiles (n x C, tile th x min(tw, C)), t = 1 for the new cache rows
    (tr = past + i, tc = 0, [k | v] of 2C floats). tiles: the new rows' qkv tiles in (tr, tc) order;
    kv: the cached rows 0 .. past-1 concatenated (bytes), or as a float32 array (past, 2C)."""
    f = F32
    qkv = whole(tiles, rows, cols, th, tw, 'attention_cached')
    C = cols // 3
    old = kv if isinstance(kv, np.ndarray) else floats(kv)
    if old.size != past * 2 * C:
        error('pg_llm: attention_cached: the cache holds %d floats, expected %d positions of 2 x %d'
              % (old.size, past, C))
    new_kv = np.ascontiguousarray(qkv[:, C:])
    kvs = np.vstack([old.reshape(past, 2 * C), new_kv])  # (past + rows, 2C)
    y = attend(qkv[:, :C], kvs, past, n_head)
    otw = min(tw, C)
    for r in range(0, rows, th):
        for c in range(0, C, otw):
            yield 0, r // th, c // otw, np.ascontiguousarray(y[r:r + th, c:c + otw], dtype=f).tobytes()
    for i in range(rows):
        yield 1, past + i, 0, new_kv[i].tobytes()
