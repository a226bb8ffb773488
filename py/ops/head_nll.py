"""head_nll: the training loss at the top of the model, fused: mean cross-entropy of targets under the logits
x @ head^T, with the gradients of scale * loss for x and for the head produced in the same call (the numpy side
and why: py/kernels/head_train.py). Not recorded on the tape: it is the root of a training backward
(llm_gpt2_loss_backward hands dx to llm_backward and dhead to the head's gradient). With p_tape, dhead stays in
the backend's memory as the tape's pending gradient of the head: the tied wte's fused embedding backward
(ops/gpt2_embed.py) adds its part and writes wte's gradient once; llm_head_nll_flush writes it if no op took it.

Tiling: one microkernel call receives every tile of x, in (tr, tc) order; dx has x's tiling and dhead the head's.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.head_train import flush_kernel, head_kernel
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "kernels/head_nll.sql"
ORDER = 36

RUN = """
    WITH o AS MATERIALIZED (
      SELECT k.k, k.tr, k.tc, k.data, k.nll
      FROM (
        SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles FROM llm_tile AS t WHERE t.tensor_id = p_x
      ) AS g
      CROSS JOIN LATERAL llm_mk_head_nll(g.tiles, v_geom, p_head, p_targets, p_scale / v_geom[1], v_htile,
                                       coalesce(p_tape, 0), coalesce(p_ln, '{}'), p_eps, v_ltiles,
                                       coalesce(dln, '{}')) AS k
    ), w AS (
      INSERT INTO llm_tile (tensor_id, tr, tc, data)
      SELECT CASE o.k WHEN 1 THEN dx WHEN 2 THEN dhead ELSE dln[o.k - 2] END, o.tr, o.tc, o.data
      FROM o WHERE o.k > 0
      RETURNING 1
    )
    SELECT (SELECT count(*) FROM w), (SELECT o.nll FROM o WHERE o.k = 0) INTO v_n, loss"""


def _run() -> str:
    body = plpgsql("r llm_tensor; rh llm_tensor; v_geom INT[]; v_htile INT[]; v_ltiles INT[] := '{}'; v_n BIGINT;",
                   """
        r := llm_input(p_x, 'head_nll', 'x');
        rh := llm_input(p_head, 'head_nll', 'head');
        v_geom := ARRAY[llm_rows(r.shape), llm_cols(r.shape), least(r.tile[1], llm_rows(r.shape)),
                        least(r.tile[2], llm_cols(r.shape))];
        v_htile := ARRAY[least(rh.tile[1], llm_rows(rh.shape)), least(rh.tile[2], llm_cols(rh.shape))];
        IF llm_cols(rh.shape) <> v_geom[2] OR cardinality(p_targets) IS DISTINCT FROM v_geom[1] THEN
          RAISE EXCEPTION 'pg_llm: head_nll: x "%" %, head "%" % and % targets do not fit', r.name,
            llm_shape_text(r.shape), rh.name, llm_shape_text(rh.shape), coalesce(cardinality(p_targets), 0)
            USING HINT = 'x is (B*T, C), the head (vocab, C), one target per row of x.';
        END IF;
        dx := llm_tensor_like(p_x, 'head_nll.dx');
        IF p_ln IS NOT NULL AND (cardinality(p_ln) <> 2 OR array_position(p_ln, NULL) IS NOT NULL OR EXISTS (
             SELECT 1 FROM unnest(p_ln) AS u(id) LEFT JOIN llm_tensor AS v ON v.id = u.id
             WHERE llm_rows(v.shape) * llm_cols(v.shape) IS DISTINCT FROM v_geom[2])) THEN
          RAISE EXCEPTION 'pg_llm: head_nll: p_ln must be the ids of ln_f''s weight and bias (% values each), got %',
            v_geom[2], p_ln;
        END IF;
        IF p_tape IS NULL THEN
          dhead := llm_tensor_like(p_head, 'grad');
        END IF;
        IF p_ln IS NOT NULL THEN
          dln := ARRAY[llm_tensor_like(p_ln[1], 'grad'), llm_tensor_like(p_ln[2], 'grad')];
          v_ltiles := ARRAY(SELECT e.v FROM unnest(p_ln) WITH ORDINALITY AS u(id, k)
                            JOIN llm_tensor AS v ON v.id = u.id
                            CROSS JOIN LATERAL unnest(ARRAY[1, least(v.tile[2], llm_cols(v.shape))])
                              WITH ORDINALITY AS e(v, j) ORDER BY u.k, e.j);
        END IF;
        @run;
        loss := loss / v_geom[1];
    """, run=RUN)
    return function("llm_head_nll", "p_x BIGINT, p_head BIGINT, p_targets INT[], p_scale FLOAT8 DEFAULT 1, "
                    "p_tape BIGINT DEFAULT NULL, p_ln BIGINT[] DEFAULT NULL, p_eps FLOAT8 DEFAULT 1e-5, "
                    "OUT loss FLOAT8, OUT dx BIGINT, OUT dhead BIGINT, OUT dln BIGINT[]", "RECORD", body,
                    settings=KERNEL_SETTINGS,
                    note="""
        op: fused LM head + cross-entropy. x (N, C), head (V, C), targets (N ids) -> the mean NLL of the targets
        under x @ head^T, and new scratch tensors dx (N, C) and dhead (V, C): the gradients of p_scale * loss
        (with p_tape, dhead NULL: kept as the tape's pending gradient of the head, see llm_head_nll_flush). With
        p_ln (ln_f's weight and bias ids), x is the last block's output: ln_f(x, eps p_eps) feeds the head, dx is
        through ln_f and dln holds ln_f's two gradients.
        tiling: one llm_mk_head_nll call over every tile of x; logits in chunks of 1024 rows, never stored.""")


FLUSH = "SELECT k.tr, k.tc, k.data FROM llm_mk_head_nll_flush(p_tape, p_head, v_htile, v_g) AS k"


def _flush() -> str:
    body = plpgsql("rh llm_tensor; v_htile INT[]; v_g BIGINT; v_n BIGINT := 0; f RECORD;", """
        rh := llm_input(p_head, 'head_nll_flush', 'head');
        v_htile := ARRAY[least(rh.tile[1], llm_rows(rh.shape)), least(rh.tile[2], llm_cols(rh.shape))];
        v_g := llm_tensor_like(p_head, 'grad');
        FOR f IN
          @flush
        LOOP  -- the untied head's gradient, once per micro-batch: its tiles, or one row when the tape holds it
          v_n := v_n + 1;
          IF f.data IS NOT NULL THEN
            INSERT INTO llm_tile (tensor_id, tr, tc, data) VALUES (v_g, f.tr, f.tc, f.data);
          END IF;
        END LOOP;
        IF v_n = 0 THEN
          PERFORM llm_tensor_drop(v_g);
          RETURN NULL;
        END IF;
        RETURN v_g;
    """, flush=FLUSH)
    return function("llm_head_nll_flush", "p_tape BIGINT, p_head BIGINT", "BIGINT", body, settings=KERNEL_SETTINGS,
                    note="""The tape's pending gradient of the head (llm_head_nll with p_tape) as a new scratch
                    tensor, or NULL when an op took it (the tied wte's embedding backward adds it to its own part).""")


def emit() -> str:
    flush = function("llm_mk_head_nll_flush", "tape BIGINT, head BIGINT, head_tile INT[], grad BIGINT",
                     "TABLE(n INT, tr INT, tc INT, data BYTEA)",
                     kernel_body(flush_kernel, "flush_kernel(GD, tape, head, head_tile, grad)"),
                     language="plpython3u", volatility="VOLATILE", strict=True, settings=("jit = off",), note="""
        head_nll microkernel: the tiles of the tape's pending head gradient, taken out of the backend's memory, as
        tensor grad's (one row without data when the tape holds its gradients: then kept under grad).""")
    mk = function("llm_mk_head_nll", "tiles BYTEA[], geom INT[], head BIGINT, targets INT[], scale FLOAT8, "
                  "head_tile INT[], tape BIGINT, ln BIGINT[], eps FLOAT8, ln_tiles INT[], ln_ids BIGINT[]",
                  "TABLE(k INT, tr INT, tc INT, data BYTEA, nll FLOAT8)",
                  kernel_body(head_kernel, "head_kernel(plpy, GD, tiles, geom, head, targets, scale, head_tile, "
                                           "tape, ln, eps, ln_tiles, ln_ids)"),
                  language="plpython3u", volatility="STABLE", strict=True, settings=("jit = off",), note="""
        head_nll microkernel: k = 0 one row with the NLL sum (float64), k = 1 dx's tiles, k = 2 dhead's tiles,
        k = 3, 4 ln_f's gradients (ln: ln_f's ids applied to x first, or empty)
        (scale: the factor of the gradients, per row; tape not 0: dhead kept as its pending gradient, no k = 2
        rows). The head comes from the backend's weight cache.""")
    return "\n".join([comment(__doc__ or ""), mk, flush, _run(), _flush()])
