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
the same assembled weight blocks, float32 bias and residual adds, attention_cached, gelu_tile): the numpy
part is py/kernels/block_step.py.
"""
from __future__ import annotations

from pg_llm.config import LAYER
from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.block_step import step_kernel

SQL_FILE = "kernels/block_step.sql"
ORDER = 32

BLOCK_PARAMS = tuple(name for name, _ in LAYER)  # the block's 12 parameters in config.BLOCK order


IDS = """
    SELECT v.id
    FROM generate_series(0, p_n_layer - 1) AS l(i)
    CROSS JOIN unnest(v_names) WITH ORDINALITY AS s(name, k)
    LEFT JOIN llm_tensor AS v ON v.model = p_model AND v.name = 'h.' || l.i || '.' || s.name AND v.role = 'param'
      AND v.id > 0
    ORDER BY l.i, s.k"""


def emit() -> str:
    kernel = function(
        "llm_mk_gpt2_block_step", "x BYTEA, params BIGINT[], cache BIGINT, past INT, n_head INT, eps FLOAT8",
        "BYTEA[]", kernel_body(step_kernel, "step_kernel(plpy, GD, x, params, cache, past, n_head, eps)"),
        language="plpython3u", volatility="STABLE", strict=True,
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
