"""The fused GPT-2 block over arrays (block_rows: n new rows against a key/value cache), behind the one-token
decoding step (the SQL side: py/ops/block_step.py) and the fused generation (kernels/decode.py); the same numpy
functions as the kernel chain (layernorm_rows, np.matmul on the same assembled weight blocks, float32 bias and
residual adds, attend, gelu)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.attention_cache import attend
from pg_llm.kernels.gelu import gelu
from pg_llm.kernels.layernorm import layernorm_rows
from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import block, floats
from pg_llm.kernels.weight_cache import cache_budget, cached_rows, cached_tensors


def block_shapes(w: Sequence[np.ndarray], C: int) -> list[tuple]:
    """The parameters (index, shape, expected) whose shapes do not fit a block of width C (Conv1D [in, out];
    1-D parameters as one row)."""
    F = w[8].shape[1]
    want = [(1, C), (1, C), (C, 3 * C), (1, 3 * C), (C, C), (1, C), (1, C), (1, C), (C, F), (1, F), (F, C), (1, C)]
    return [(i, m.shape, s) for i, (m, s) in enumerate(zip(w, want, strict=True)) if m.shape != s]


def gpt2_block(x: np.ndarray, w: Sequence[np.ndarray], eps: float, attn: Callable[[np.ndarray], np.ndarray],
               drop: Callable[[np.ndarray, int], np.ndarray] | None = None, keep: dict | None = None) -> np.ndarray:
    """One pre-LayerNorm GPT-2 block over rows x (n, C) float32, w the 12 parameters in BLOCK_PARAMS order as
    float32 arrays; attn(qkv (n, 3C)) -> (n, C) is the attention of these rows (cached, packed, ...). Training
    (kernels/block_train.py): drop(branch, site) is the dropout of the residual branches (site 1: attn.c_proj,
    2: mlp.c_proj), and keep, when given, receives the intermediates the backward needs."""
    ln1g, ln1b, wqkv, bqkv, wo, bo, ln2g, ln2b, wfc, bfc, wp, bp = w

    def linear(a: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        y = np.matmul(a, weight)
        y += bias  # in place: the same float32 sums as y + bias
        return y

    def branch(a: np.ndarray, site: int) -> np.ndarray:
        return a if drop is None else drop(a, site)

    def save(name: str, a: np.ndarray) -> np.ndarray:
        if keep is not None:
            keep[name] = a
        return a
    # t is rebound at every step, so without keep each intermediate is freed as soon as the next one exists
    t = save('h1', layernorm_rows(x, ln1g, ln1b, eps))
    t = save('qkv', linear(t, wqkv, bqkv))
    t = save('att', attn(t))
    a = branch(linear(t, wo, bo), 1)
    a += x  # x + (...), bit for bit (addition commutes)
    save('a', a)
    t = save('h2', layernorm_rows(a, ln2g, ln2b, eps))
    t = save('f', linear(t, wfc, bfc))
    t = save('g', gelu(t))
    y = branch(linear(t, wp, bp), 2)
    y += a
    return y


def block_rows(x: np.ndarray, w: Sequence[np.ndarray], kv: np.ndarray, past: int, n_head: int,
               eps: float) -> np.ndarray:
    """gpt2_block() for n new rows x at positions past .. past+n-1 against the layer's cache kv (>= past + n, 2C)
    holding rows 0 .. past-1: rows past .. past+n-1 get the new [k | v]. Returns y (n, C)."""
    n, C = x.shape

    def attn(qkv: np.ndarray) -> np.ndarray:
        kv[past:past + n] = qkv[:, C:]
        return attend(qkv[:, :C], kv[:past + n], past, n_head)
    return gpt2_block(x, w, eps, attn)


def gpt2_block_step(x: np.ndarray, w: Sequence[np.ndarray], kv: np.ndarray, past: int, n_head: int,
                    eps: float) -> tuple[np.ndarray, np.ndarray]:
    """block_rows for one new position: x (1, C), kv the cached [k | v] rows (past, 2C). Returns (y (1, C), new
    cache row (2C,))."""
    kvs = np.empty((past + 1, kv.shape[1]), dtype=np.float32)
    kvs[:past] = kv
    return block_rows(x, w, kvs, past, n_head, eps), kvs[past]


def step_kernel(plpy: Any, GD: dict, x: bytes, params: Sequence[int], cache: int, past: int, n_head: int,
                eps: float) -> list[bytes]:
    """llm_mk_gpt2_block_step: the 12 weights from the weight cache, the cache rows from its mirror; returns
    [new x row, new cache row]."""
    budget = cache_budget(plpy, GD)
    if len(params) != 12:
        error('pg_llm: gpt2_block_step: %d parameter ids, expected the 12 of a block' % len(params))
    w = cached_tensors(plpy, GD, params, block, budget)
    xa = floats(x).reshape(1, -1)
    C = xa.shape[1]
    bad = block_shapes(w, C)
    if bad:
        i, got, want = bad[0]
        error('pg_llm: gpt2_block_step: parameter %d (tensor id %s) has shape %s, expected %s for x of %d values'
              % (i, params[i], got, want, C))
    kv = cached_rows(plpy, GD, cache, past, 2 * C, budget)
    y, row = gpt2_block_step(xa, w, kv, past, n_head, eps)
    return [y.tobytes(), row.tobytes()]
