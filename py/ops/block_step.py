"""gpt2_block_step: one GPT-2 block for ONE new position with a key/value cache, in one PL/Python call.

    x' = x + c_proj(attention_cached(c_attn(ln_1(x)), cache))
    y  = x' + mlp.c_proj(gelu(mlp.c_fc(ln_2(x'))))               returns [y, the new cache row [k | v]]

Why: a decoding step pushes one row through every layer. As a chain of tile kernels that is ~14 kernel calls
per layer (~170 per token), each creating a scratch tensor, checking its output, inserting tiles through the
foreign key and deleting them at the end: ~60 ms a token on top of the matmuls once the weights come from the
weight cache (weight_cache.py). Here a layer is one call: x travels as a float32 bytea, the 12 parameters come
from the weight cache (one query for all their geometries and fingerprints; only changed tensors are read),
the cache rows from the backend's mirror of the cache tensor (one fingerprint query; only rows appended since
the last step are read), and the caller inserts the new cache row. llm_gpt2_forward_cached takes this path for
a one-token step with caches (setting pg_llm.fused_decode = off keeps the kernel chain, the reference).

Same numbers as the chain: the same numpy functions on the same float32 values (layernorm_block, np.matmul on
the same assembled weight blocks, float32 bias and residual adds, attention_cached, gelu_tile).
"""
from __future__ import annotations

import inspect
import textwrap

from pg_llm.gen.emit import _BOOT, comment, function, plpgsql
from pg_llm.ops import weight_cache
from pg_llm.ops.attention_cache import attention_cached
from pg_llm.ops.gelu import gelu_tile
from pg_llm.ops.layernorm import layernorm_block
from pg_llm.ops.matmul import block_matrix

SQL_FILE = "kernels/block_step.sql"
ORDER = 32

BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")


def block_shapes(w, C):
    """The parameters (index, shape, expected) whose shapes do not fit a block of width C (Conv1D [in, out];
    1-D parameters as one row)."""
    F = w[8].shape[1]
    want = [(1, C), (1, C), (C, 3 * C), (1, 3 * C), (C, C), (1, C), (1, C), (1, C), (C, F), (1, F), (F, C), (1, C)]
    return [(i, m.shape, s) for i, (m, s) in enumerate(zip(w, want, strict=True)) if m.shape != s]


def gpt2_block_step(np, x, w, kv, past, n_head, eps):
    """One pre-LayerNorm GPT-2 block for one new position: x (1, C) float32, w the 12 parameters in BLOCK_PARAMS
    order as float32 arrays, kv the cached [k | v] rows (past, 2C). Returns (y (1, C), new cache row (2C,))."""
    f = '<f4'
    C = x.shape[1]
    ln1g, ln1b, wqkv, bqkv, wo, bo, ln2g, ln2b, wfc, bfc, wp, bp = w

    def ln(v, g, b):
        return np.frombuffer(layernorm_block(np, [v.tobytes()], g.tobytes(), b.tobytes(), 1, C, eps)[0],
                             dtype=f).reshape(1, C)
    qkv = np.matmul(ln(x, ln1g, ln1b), wqkv) + bqkv
    (_, _, _, a), (_, _, _, row) = attention_cached(np, [qkv.tobytes()], kv, 1, 3 * C, 1, 3 * C, past, n_head)
    x = x + (np.matmul(np.frombuffer(a, dtype=f).reshape(1, C), wo) + bo)
    h = np.matmul(ln(x, ln2g, ln2b), wfc) + bfc
    h = np.frombuffer(gelu_tile(np, h.tobytes()), dtype=f).reshape(1, -1)
    return x + (np.matmul(h, wp) + bp), np.frombuffer(row, dtype=f)


STEP_CALL = """
budget = cache_budget(plpy, GD)
if len(params) != 12:
    plpy.error('pg_llm: gpt2_block_step: %d parameter ids, expected the 12 of a block' % len(params))
w = cached_tensors(plpy, GD, params, lambda tiles, g: block_matrix(np, tiles, g), budget)
xa = np.frombuffer(x, dtype='<f4').reshape(1, -1)
C = xa.shape[1]
bad = block_shapes(w, C)
if bad:
    i, got, want = bad[0]
    plpy.error('pg_llm: gpt2_block_step: parameter %d (tensor id %s) has shape %s, expected %s for x of %d values'
               % (i, params[i], got, want, C))
kv = cached_rows(plpy, GD, np, cache, past, 2 * C, budget)
y, row = gpt2_block_step(np, xa, w, kv, past, n_head, eps)
return [y.tobytes(), row.tobytes()]"""

IDS = """
    SELECT v.id
    FROM generate_series(0, p_n_layer - 1) AS l(i)
    CROSS JOIN unnest(v_names) WITH ORDINALITY AS s(name, k)
    LEFT JOIN llm_tensor AS v ON v.model = p_model AND v.name = 'h.' || l.i || '.' || s.name AND v.role = 'param'
      AND v.id > 0
    ORDER BY l.i, s.k"""


def emit() -> str:
    fns = (block_matrix, layernorm_block, attention_cached, gelu_tile, block_shapes, gpt2_block_step)
    src = "\n".join([weight_cache.source()] + [textwrap.dedent(inspect.getsource(f)).strip() for f in fns])
    kernel = function(
        "llm_mk_gpt2_block_step", "x BYTEA, params BIGINT[], cache BIGINT, past INT, n_head INT, eps FLOAT8",
        "BYTEA[]", f"{_BOOT}\n{src}{STEP_CALL}", language="plpython3u", volatility="STABLE", strict=True,
        settings=("jit = off",), note="""
        op: one GPT-2 block for one new position (decoding). x: the position's row (C float32 values), params:
        the block's 12 durable parameter ids (llm_gpt2_block_params order), cache: the layer's KV cache holding
        exactly positions 0 .. past-1. Returns ARRAY[new x row, new cache row [k | v]] (the caller inserts the
        cache row at position past). Weights and cache rows come from the backend's weight cache.""")
    names = ", ".join(f"'{n}'" for n in BLOCK_PARAMS)
    body = plpgsql(f"v_names TEXT[] := ARRAY[{names}];\nv_ids BIGINT[]; v_missing INT;", """
        v_ids := ARRAY(
          @ids
        );
        v_missing := array_position(v_ids, NULL);
        IF v_missing IS NOT NULL THEN  -- raises llm_tensor's error naming the missing parameter
          PERFORM llm_param(p_model, 'h.' || (v_missing - 1) / 12 || '.' || v_names[(v_missing - 1) % 12 + 1]);
        END IF;
        RETURN v_ids;
    """, ids=IDS)
    params = function("llm_gpt2_block_params", "p_model TEXT, p_n_layer INT", "BIGINT[]", body, volatility="STABLE",
                      note="The parameter ids of a GPT-2 model's blocks for llm_mk_gpt2_block_step: 12 per layer "
                           "(layer 0 first), or the error of the first missing one.")
    return "\n".join([comment(__doc__ or ""), kernel, params])
