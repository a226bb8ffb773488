"""attention_cached: causal multi-head attention of new positions against a key/value cache (incremental decoding).

Forward:  y = llm_attention_cached(qkv, cache, p_past, n_head)
          qkv (n, 3C): the c_attn output of n new positions p_past .. p_past+n-1 of ONE sequence;
          cache (n_ctx, 2C), tile (1, 2C): row j = [k_j | v_j] of position j, filled for j < p_past.
          Appends the new rows' [k | v] to the cache (rows p_past .. p_past+n-1) and returns y (n, C):
          y_i,h = softmax(q_i,h K_h^T / sqrt(hd) + causal mask) V_h over cached positions j <= p_past + i.
          Prefill is p_past = 0, n = prompt length (the same result as llm_attention on the prompt); a decoding
          step is n = 1: one row through the layer, attending to every cached row.

The cache is a scratch tensor of role 'cache' (negative id, UNLOGGED partition) with one tile per position,
so appending a position is one INSERT and never rewrites earlier rows. Per step the kernel reads the cache
rows once (one string_agg in position order, unpacked by np.frombuffer): 8 * C bytes per cached position and
layer, against the 4 * 12 * C^2 bytes of weights every layer reads per token, so a step costs nearly the same
at any prefix. One statement inserts y's tiles and the new cache rows (llm_mk_attention_cached yields both).
numpy: py/kernels/attention_cache.py.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.attention_cache import attention_cached
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "kernels/attention_cache.sql"
ORDER = 31


FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT CASE WHEN o.t = 0 THEN v_out ELSE p_cache END, o.tr, o.tc, o.data
    FROM (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_qkv
    ) AS g
    CROSS JOIN (
      SELECT coalesce(string_agg(t.data, ''::BYTEA ORDER BY t.tr), ''::BYTEA) AS kv
      FROM llm_tile AS t WHERE t.tensor_id = p_cache
    ) AS c
    CROSS JOIN LATERAL llm_mk_attention_cached(g.tiles, c.kv, v_rows, v_cols, r.tile[1], r.tile[2], p_past,
                                               p_n_head) AS o
"""

FILLED = "SELECT count(*) AS n, max(t.tr) AS m FROM llm_tile AS t WHERE t.tensor_id = p_cache"


def _forward() -> str:
    body = plpgsql("""
        v_op TEXT := 'attention_cached';
        r llm_tensor; rc llm_tensor; v_rows INT; v_cols INT; v_c INT; v_otile INT[]; v_out BIGINT;
        v_filled BIGINT; v_max INT;
    """, """
        r := llm_input(p_qkv, v_op, 'qkv');
        rc := llm_input(p_cache, v_op, 'cache');
        v_rows := llm_rows(r.shape); v_cols := llm_cols(r.shape); v_c := v_cols / 3;
        IF v_cols % 3 <> 0 OR p_n_head IS NULL OR p_n_head < 1 OR v_c % p_n_head <> 0 THEN
          RAISE EXCEPTION 'pg_llm: %: qkv "%" has % columns: need 3 * C with C divisible by n_head = %',
            v_op, r.name, v_cols, p_n_head;
        END IF;
        IF llm_cols(rc.shape) <> 2 * v_c OR rc.tile <> ARRAY[1, 2 * v_c] THEN
          RAISE EXCEPTION 'pg_llm: %: cache "%" has shape % tile %, expected (n_ctx, %) tile {1,%}', v_op,
            rc.name, llm_shape_text(rc.shape), rc.tile, 2 * v_c, 2 * v_c
            USING HINT = 'llm_kv_cache_create(model) (api/generate.sql) makes the caches of a model.';
        END IF;
        IF p_past IS NULL OR p_past < 0 OR p_past + v_rows > llm_rows(rc.shape) THEN
          RAISE EXCEPTION 'pg_llm: %: positions % .. % do not fit cache "%" of % positions', v_op, p_past,
            p_past + v_rows - 1, rc.name, llm_rows(rc.shape) USING HINT = 'The cache holds the model context.';
        END IF;
        SELECT q.n, q.m INTO v_filled, v_max FROM (
          @filled
        ) AS q;
        IF v_filled <> p_past OR coalesce(v_max + 1, 0) <> p_past THEN
          RAISE EXCEPTION 'pg_llm: %: cache "%" holds % positions, expected exactly 0 .. % (p_past = %)', v_op,
            rc.name, v_filled, p_past - 1, p_past;
        END IF;
        v_otile := ARRAY[r.tile[1], least(r.tile[2], v_c)];
        v_out := llm_output(p_out, v_op, ARRAY[v_rows, v_c], v_otile, FALSE);
        @forward;
        RETURN v_out;
    """, filled=FILLED, forward=FORWARD)
    return function(
        "llm_attention_cached", "p_qkv BIGINT, p_cache BIGINT, p_past INT, p_n_head INT, p_out BIGINT DEFAULT NULL",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""
        op: cached causal attention. qkv (n, 3C) of positions p_past .. p_past+n-1, cache (n_ctx, 2C) holding
        [k | v] of positions 0 .. p_past-1 -> y (n, C); the new rows' [k | v] are appended to the cache.
        tiling: one llm_mk_attention_cached call; y tiles are (qkv tile rows, min(qkv tile cols, C)); the cache
        has one tile (1, 2C) per position.""")


def emit() -> str:
    mk = microkernel(
        "llm_mk_attention_cached",
        "tiles BYTEA[], kv BYTEA, rows INT, cols INT, th INT, tw INT, past INT, n_head INT",
        "TABLE(t INT, tr INT, tc INT, data BYTEA)", attention_cached,
        note="""
        cached attention microkernel: the new rows' qkv tiles and the cached [k | v] rows -> y tiles (t = 0) and
        the new cache rows (t = 1, tr = position).""")
    return "\n".join([comment(__doc__ or ""), mk, _forward()])
