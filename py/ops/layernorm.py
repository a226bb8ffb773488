"""layernorm: y = (x - mean) / sqrt(var + eps) * g + b over each row of x (R, C).

Forward:  y = llm_layernorm(x, g, b)                     (GPT-2 ln_1, ln_2, ln_f; eps 1e-5)
Backward: llm_layernorm_backward(x, g, dy, dx, dg, db)   dx per row, dg = sum_rows dy * xhat, db = sum_rows dy

Tiling: g and b are 1-D (C,) tensors stored as one row, cut in the same column tiles as x. One microkernel
call per tile-row block of x (array_agg(data ORDER BY tc) GROUP BY tr) normalizes whole rows and returns the
block's output tiles as bytea[], unnested WITH ORDINALITY into (tr, tc). The backward kernel also returns
per-block partials of dg and db, reduced over blocks with the llm_tile_sum aggregate. mean and rstd are
recomputed from x (cheaper than caching them as tensors), in float64. numpy: py/kernels/layernorm.py.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.layernorm import layernorm_backward_block, layernorm_block
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT

SQL_FILE = "kernels/layernorm.sql"
ORDER = 20

OP = Op("layernorm", ("x", "w", "b"), args=(("eps", "FLOAT8"),),
        wrapper="p_x BIGINT, p_w BIGINT, p_b BIGINT, p_eps FLOAT8",
        kernel="llm_layernorm(p_x, p_w, p_b, NULL, p_eps)", note="out = ln(x; w, b); dx, dw, db", backward="""
        dx := like({x}, 'dx');
        dw := like({w}, 'dg');
        db := like({b}, 'db');
        PERFORM llm_layernorm_backward({x}, {w}, {g}, dx, dw, db, FALSE, {eps});
        acc({x}, dx);
        acc({w}, dw);
        acc({b}, db);""")


def _param() -> str:
    body = plpgsql("r llm_tensor; v_row BYTEA;", """
        r := llm_input(p_id, p_op, p_arg);
        IF llm_rows(r.shape) <> 1 OR llm_cols(r.shape) <> llm_cols(p_x.shape) THEN
          RAISE EXCEPTION 'pg_llm: %: % "%" has shape %, expected (%,) to match x "%" of shape %',
            p_op, p_arg, r.name, llm_shape_text(r.shape), llm_cols(p_x.shape), p_x.name, llm_shape_text(p_x.shape);
        END IF;
        IF r.tile[2] <> p_x.tile[2] THEN
          RAISE EXCEPTION 'pg_llm: %: % "%" is cut in column tiles of %, expected % like x "%"',
            p_op, p_arg, r.name, r.tile[2], p_x.tile[2], p_x.name
            USING HINT = 'Store 1-D parameters with tile ARRAY[1, <x tile cols>].';
        END IF;
        v_row := (
          @q
        );
        IF coalesce(length(v_row), 0) <> 4 * llm_cols(r.shape) THEN
          RAISE EXCEPTION 'pg_llm: %: % "%" of shape % is missing tiles', p_op, p_arg, r.name, llm_shape_text(r.shape);
        END IF;
        RETURN v_row;
    """, q="SELECT string_agg(t.data, ''::BYTEA ORDER BY t.tc) FROM llm_tile AS t WHERE t.tensor_id = p_id")
    return function("llm_layernorm_param", "p_id BIGINT, p_x llm_tensor, p_op TEXT, p_arg TEXT", "BYTEA", body,
                    volatility="STABLE",
                    note="""
                    Check a 1-D layernorm gain/bias (C,) against x (R, C) (one row, x's column tiles) and
                    return its whole row as one float32 payload.""")


FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, b.tr, o.k - 1, o.data
    FROM (
      SELECT t.tr, array_agg(t.data ORDER BY t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_x GROUP BY t.tr
    ) AS b
    CROSS JOIN LATERAL unnest(llm_mk_layernorm(b.tiles, v_g, v_b, llm_tile_dim(v_rows, v_th, b.tr), v_cols, p_eps))
      WITH ORDINALITY AS o(data, k)
    WHERE TRUE
    """ + UPSERT

CHECK_EPS = """
        IF p_eps IS NULL OR p_eps < 0 THEN
          RAISE EXCEPTION 'pg_llm: %: eps must be >= 0, got %', v_op, p_eps;
        END IF;"""


def _forward() -> str:
    body = plpgsql("""
        v_op TEXT := 'layernorm';
        rx llm_tensor; v_rows INT; v_cols INT; v_th INT; v_g BYTEA; v_b BYTEA; v_out BIGINT;
    """, CHECK_EPS + """
        rx := llm_input(p_x, v_op, 'x');
        v_rows := llm_rows(rx.shape); v_cols := llm_cols(rx.shape); v_th := rx.tile[1];
        v_g := llm_layernorm_param(p_g, rx, v_op, 'g');
        v_b := llm_layernorm_param(p_b, rx, v_op, 'b');
        v_out := llm_output(p_out, v_op, rx.shape, rx.tile, p_accumulate);
        @forward;
        RETURN v_out;
    """, forward=FORWARD)
    return function(
        "llm_layernorm",
        "p_x BIGINT, p_g BIGINT, p_b BIGINT, p_out BIGINT DEFAULT NULL, p_eps FLOAT8 DEFAULT 1e-5, "
        "p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""
        op: layernorm forward. x (R, C), g (C,), b (C,) -> out (R, C) = (x - mean) / sqrt(var + eps) * g + b
        per row (torch.nn.functional.layer_norm). tiling: out has x's tile; g and b are one row cut in x's column
        tiles; one llm_mk_layernorm call per tile-row block. p_out NULL allocates a scratch tensor.""")


BACKWARD = """
    WITH parts AS (
      SELECT b.tr, o.k, o.data
      FROM (
        SELECT t.tr, array_agg(t.data ORDER BY t.tc) FILTER (WHERE t.tensor_id = p_x) AS xs,
               array_agg(t.data ORDER BY t.tc) FILTER (WHERE t.tensor_id = p_dy) AS dys
        FROM llm_tile AS t WHERE t.tensor_id IN (p_x, p_dy) GROUP BY t.tr
      ) AS b
      CROSS JOIN LATERAL unnest(llm_mk_layernorm_backward(b.xs, b.dys, v_g, llm_tile_dim(v_rows, v_th, b.tr),
                                                          v_cols, p_eps)) WITH ORDINALITY AS o(data, k)
    )
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT p_dx, parts.tr, parts.k - 1, parts.data FROM parts WHERE parts.k <= v_nc AND p_dx IS NOT NULL
    UNION ALL
    SELECT p_dg, 0, parts.k - v_nc - 1, llm_tile_sum(parts.data ORDER BY parts.tr) FROM parts
    WHERE parts.k > v_nc AND parts.k <= 2 * v_nc AND p_dg IS NOT NULL GROUP BY parts.k
    UNION ALL
    SELECT p_db, 0, parts.k - 2 * v_nc - 1, llm_tile_sum(parts.data ORDER BY parts.tr) FROM parts
    WHERE parts.k > 2 * v_nc AND p_db IS NOT NULL GROUP BY parts.k
    """ + UPSERT


def _backward() -> str:
    body = plpgsql("""
        v_op TEXT := 'layernorm_backward';
        rx llm_tensor; rdy llm_tensor; rg llm_tensor;
        v_rows INT; v_cols INT; v_th INT; v_nc INT; v_g BYTEA;
    """, CHECK_EPS + """
        rx := llm_input(p_x, v_op, 'x');
        rdy := llm_input(p_dy, v_op, 'dy');
        v_rows := llm_rows(rx.shape); v_cols := llm_cols(rx.shape); v_th := rx.tile[1];
        v_nc := (v_cols + rx.tile[2] - 1) / rx.tile[2];
        IF llm_rows(rdy.shape) <> v_rows OR llm_cols(rdy.shape) <> v_cols OR rdy.tile <> rx.tile THEN
          RAISE EXCEPTION 'pg_llm: %: dy "%" has shape % tile %, expected shape % tile % like x "%"',
            v_op, rdy.name, llm_shape_text(rdy.shape), rdy.tile, llm_shape_text(rx.shape), rx.tile, rx.name;
        END IF;
        v_g := llm_layernorm_param(p_g, rx, v_op, 'g');
        rg := llm_tensor_get(p_g);
        IF p_dg = p_db THEN
          RAISE EXCEPTION 'pg_llm: %: dg and db are the same tensor (id %)', v_op, p_dg;
        END IF;
        PERFORM llm_output(p_dx, v_op, rx.shape, rx.tile, p_accumulate) WHERE p_dx IS NOT NULL;
        PERFORM llm_output(p_dg, v_op, rg.shape, rg.tile, p_accumulate) WHERE p_dg IS NOT NULL;
        PERFORM llm_output(p_db, v_op, rg.shape, rg.tile, p_accumulate) WHERE p_db IS NOT NULL;
        @backward;
    """, backward=BACKWARD)
    return function(
        "llm_layernorm_backward",
        "p_x BIGINT, p_g BIGINT, p_dy BIGINT, p_dx BIGINT, p_dg BIGINT, p_db BIGINT, "
        "p_accumulate BOOLEAN DEFAULT TRUE, p_eps FLOAT8 DEFAULT 1e-5",
        "VOID", body, settings=KERNEL_SETTINGS,
        note="""
        op: layernorm backward for y = layernorm(x, g, b). x, dy (R, C), g (C,) -> dx (R, C) (x's tile),
        dg = sum over rows of dy * xhat and db = sum over rows of dy, both (C,) with g's tile. Each is written (or
        accumulated) into an existing tensor; pass NULL to skip one. tiling: one llm_mk_layernorm_backward call
        per tile-row block returns dx tiles and the block's dg/db partials, summed with llm_tile_sum.""")


def emit() -> str:
    mk = microkernel(
        "llm_mk_layernorm", "x_tiles BYTEA[], g_row BYTEA, b_row BYTEA, rows INT, cols INT, eps FLOAT8", "BYTEA[]",
        layernorm_block,
        note="""
        layernorm microkernel: one tile-row block of x (rows x cols, tiles ordered by column) and the whole
        g, b rows -> the block's output tiles (same widths), in column order.""")
    mkb = microkernel(
        "llm_mk_layernorm_backward", "x_tiles BYTEA[], dy_tiles BYTEA[], g_row BYTEA, rows INT, cols INT, eps FLOAT8",
        "BYTEA[]", layernorm_backward_block,
        note="""
        layernorm backward microkernel: one tile-row block of x and dy (rows x cols) -> n dx tiles, then n
        partial dg tiles (1 x w), then n partial db tiles, n = number of column tiles.""")
    return "\n".join([comment(__doc__ or ""), mk, mkb, _param(), _forward(), _backward()])
