"""Training from scratch: llm_model_init creates a model with GPT-2's initialization, all in SQL.

GPT-2 / Hugging Face init: Linear and Embedding weights ~ N(0, initializer_range), with the residual
projections (attn.c_proj.weight, mlp.c_proj.weight) scaled by 1/sqrt(2 * n_layer); biases 0; LayerNorm
weight 1 and bias 0. Each tile draws from its own seeded generator (seed, tensor name, tile), so the same
seed gives the same model in any session and for any order of tile writes. The numpy microkernel:
py/kernels/init.py.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.init import normal_tile
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "api/init.sql"
ORDER = 79


FILL = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT p_id, i, j, llm_mk_normal(llm_tile_dim(llm_rows(r.shape), r.tile[1], i),
                                     llm_tile_dim(llm_cols(r.shape), r.tile[2], j), p_mean, p_std,
                                     llm_site_seed(p_seed, r.name || ':' || i || ':' || j))
    FROM generate_series(0, (llm_rows(r.shape) - 1) / r.tile[1]) AS i
    CROSS JOIN generate_series(0, (llm_cols(r.shape) - 1) / r.tile[2]) AS j
"""


def _fill() -> str:
    body = plpgsql("r llm_tensor;", """
        r := llm_input(p_id, 'fill_normal', 'tensor');
        IF p_std IS NULL OR p_std < 0 THEN
          RAISE EXCEPTION 'pg_llm: fill_normal: std must be >= 0, got %', p_std
            USING HINT = 'std 0 fills with the mean; GPT-2 uses initializer_range (0.02).';
        END IF;
        DELETE FROM llm_tile WHERE tensor_id = p_id;
        @fill;
        RETURN p_id;
    """, fill=FILL)
    return function("llm_tensor_fill_normal", "p_id BIGINT, p_mean FLOAT8, p_std FLOAT8, p_seed BIGINT", "BIGINT",
                    body, settings=KERNEL_SETTINGS,
                    note="Fill every tile of a tensor with N(mean, std) (std 0: the constant mean), seeded per tile.")


def _init() -> str:
    body = plpgsql("c llm_model_config; r RECORD; v_id BIGINT; v_std FLOAT8; v_mean FLOAT8;", """
        IF seed IS NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_model_init: seed must not be NULL'
            USING HINT = 'Leave seed out (0), or pass any integer: the same seed gives the same weights.';
        END IF;
        PERFORM llm_model_create(model, config, note);
        c := llm_model_config_get(config);
        FOR r IN SELECT p.name, p.shape FROM llm_param_names(config) AS p LOOP
          IF r.name LIKE '%ln\\_%' ESCAPE '\\' AND r.name LIKE '%.weight' THEN
            v_mean := 1; v_std := 0;
          ELSIF r.name LIKE '%.bias' OR r.name LIKE '%ln\\_%' ESCAPE '\\' THEN
            v_mean := 0; v_std := 0;
          ELSIF r.name LIKE '%c\\_proj.weight' ESCAPE '\\' THEN
            v_mean := 0; v_std := c.initializer_range / sqrt(2.0 * c.n_layer);
          ELSE
            v_mean := 0; v_std := c.initializer_range;
          END IF;
          v_id := llm_tensor_create(r.name, r.shape, NULL, 'param', model);
          PERFORM llm_tensor_fill_normal(v_id, v_mean, v_std, seed);
        END LOOP;
        RETURN (SELECT m FROM llm_model AS m WHERE m.name = model);
    """)
    return function("llm_model_init", "model TEXT, config TEXT DEFAULT 'gpt2-small', seed BIGINT DEFAULT 0, "
                    "note TEXT DEFAULT NULL", "llm_model", body, settings=KERNEL_SETTINGS,
                    note="Create a model from a config with GPT-2's random initialization (train from scratch).")


def emit() -> str:
    mk = microkernel("llm_mk_normal", "rows INT, cols INT, mean FLOAT8, std FLOAT8, seed BIGINT", "BYTEA",
                     normal_tile, note="init microkernel: one tile of seeded N(mean, std) float32.")
    return "\n".join([comment(__doc__ or ""), mk, _fill(), _init()])
