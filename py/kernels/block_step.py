"""The fused decoding step (the SQL side: py/ops/block_step.py): one GPT-2 block for one new position with a
key/value cache, in one call, from the same numpy functions as the kernel chain (layernorm_block, np.matmul on
the same assembled weight blocks, float32 bias and residual adds, attention_cached, gelu)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.attention_cache import attention_cached
from pg_llm.kernels.gelu import gelu_tile
from pg_llm.kernels.layernorm import layernorm_block
from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import block, floats
from pg_llm.kernels.weight_cache import cache_budget, cached_rows, cached_tensors


def block_shapes(w: Sequence[np.ndarray], C: int) -> list[tuple]:
    """The parameters (index, shape, expected) whose shapes do not fit a block of width C (Conv1D [in, out];
    1-D parameters as one row)."""
    F = w[8].shape[1]
    want = [(1, C), (1, C), (C, 3 * C), (1, 3 * C), (C, C), (1, C), (1, C), (1, C), (C, F), (1, F), (F, C), (1, C)]
    return [(i, m.shape, s) for i, (m, s) in enumerate(zip(w, want, strict=True)) if m.shape != s]


def gpt2_block_step(x: np.ndarray, w: Sequence[np.ndarray], kv: np.ndarray, past: int, n_head: int,
                    eps: float) -> tuple[np.ndarray, np.ndarray]:
    """One pre-LayerNorm GPT-2 block for one new position: x (1, C) float32, w the 12 parameters in BLOCK_PARAMS
    order as float32 arrays, kv the cached [k | v] rows (past, 2C). Returns (y (1, C), new cache row (2C,))."""
    C = x.shape[1]
    ln1g, ln1b, wqkv, bqkv, wo, bo, ln2g, ln2b, wfc, bfc, wp, bp = w

    def ln(v: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
        return floats(layernorm_block([v.tobytes()], g.tobytes(), b.tobytes(), 1, C, eps)[0]).reshape(1, C)
    qkv = np.matmul(ln(x, ln1g, ln1b), wqkv) + bqkv
    (_, _, _, a), (_, _, _, row) = attention_cached([qkv.tobytes()], kv, 1, 3 * C, 1, 3 * C, past, n_head)
    x = x + (np.matmul(floats(a).reshape(1, C), wo) + bo)
    h = np.matmul(ln(x, ln2g, ln2b), wfc) + bfc
    h = floats(gelu_tile(h.tobytes())).reshape(1, -1)
    return x + (np.matmul(h, wp) + bp), floats(row)


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
