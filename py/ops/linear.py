"""linear: GPT-2's fused Conv1D layer y = act(x @ W + b) [+ r], act = identity or GELU (tanh form), one kernel.

Forward:  y = x @ W + b                  llm_linear(x, W, b)
          y = gelu(x @ W + b)            llm_linear(x, W, b, p_gelu => TRUE)
          y = r + (x @ W + b)            llm_linear(x, W, b, p_residual => r)   (the residual add of a block)
          (p_pre: an existing tensor that also receives x @ W + b, the input of the GELU backward)
Backward: dx = dy @ W^T, dW = x^T @ dy, db = column sums of dy
                                         llm_linear_backward(x, W, dy, dx, dW, db)  (llm_matmul, llm_sum_rows)

Same numbers as the unfused chain llm_gelu(llm_add_bias(llm_matmul(x, W), b)): the product of one panel is the
same np.matmul over the same blocks as llm_matmul's panel kernel, the bias is added in float32 like
llm_mk_add_bias, the GELU is kernels/gelu.py's gelu_tile applied to each output tile and the residual is added to
each tile like llm_mk_add. What it saves: the matmul output, the biased output and the branch before the
residual add are never written to llm_tile nor read back (full activation writes, ~20 % of a forward at
T=1024), and two or three kernel calls per layer.

Tiling (matmul's panel form): x (R, K) tiles (th, tk), W (K, N) tiles (tk, tn), b (N,) one row of tiles
(1, tn); out (R, N) and r tiles (th, tn). Each output panel is ONE PL/Python call (llm_mk_linear_panel) that
reads x's block rows, W's block columns and the bias (and residual) tiles of the panel itself, with at most
PANEL_FLOATS floats of each operand and of the output (setting pg_llm.matmul_panel_floats, as llm_matmul).
The numpy part: py/kernels/linear.py.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op, op
from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.linear import panel_kernel
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT
from pg_llm.ops.matmul import PANELS

SQL_FILE = "kernels/linear.sql"
ORDER = 15

OP = Op("linear", ("x", "w", "b"),
        note="out = x @ w + b (b may be NULL); dx += g @ w^T, dw += x^T @ g, db += sum_rows(g)", backward="""
        dx := like({x}, 'dx');
        dw := like({w}, 'dw');
        db := like({b}, 'db');
        PERFORM llm_linear_backward({x}, {w}, {g}, dx, dw, db, FALSE);
        acc({x}, dx);
        acc({w}, dw);
        IF {b} IS NOT NULL THEN
          acc({b}, db);
        END IF;""")


# ---- SQL ----------------------------------------------------------------------------------------------------

FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT CASE WHEN o.k = 0 THEN v_out ELSE p_pre END, o.tr, o.tc, o.data
    FROM generate_series(0, v_ni - 1) AS pa(i)
    CROSS JOIN generate_series(0, v_nj - 1) AS pb(j)
    CROSS JOIN LATERAL llm_mk_linear_panel(p_x, v_gx, pa.i, v_pi, p_w, v_gw, pb.j, v_pj, p_b, p_gelu,
                                           p_pre IS NOT NULL, p_residual) AS o
    WHERE TRUE
    """ + UPSERT

CHECKS = """
    rx := llm_input(p_x, 'linear', 'x');
    rw := llm_input(p_w, 'linear', 'w');
    v_m := llm_rows(rx.shape); v_k := llm_cols(rx.shape); v_n := llm_cols(rw.shape);
    v_tm := least(rx.tile[1], v_m); v_tk := least(rx.tile[2], v_k); v_tn := least(rw.tile[2], v_n);
    IF cardinality(rw.shape) <> 2 OR llm_rows(rw.shape) <> v_k THEN
      RAISE EXCEPTION 'pg_llm: linear: weight "%" has shape %, expected (%, n): x "%" is %',
        rw.name, llm_shape_text(rw.shape), v_k, rx.name, llm_shape_text(rx.shape)
        USING HINT = 'GPT-2 Conv1D weights are [in, out]: y = x @ W + b.';
    END IF;
    IF least(rw.tile[1], v_k) <> v_tk THEN
      RAISE EXCEPTION 'pg_llm: linear: x "%" and weight "%" cut the inner dimension % in tiles of % and %',
        rx.name, rw.name, v_k, v_tk, least(rw.tile[1], v_k) USING HINT = 'Store both with the same tile along k.';
    END IF;
    IF p_b IS NOT NULL THEN
      rb := llm_input(p_b, 'linear', 'b');
      IF llm_rows(rb.shape) <> 1 OR llm_cols(rb.shape) <> v_n OR least(rb.tile[2], v_n) <> v_tn THEN
        RAISE EXCEPTION 'pg_llm: linear: bias "%" has shape % tile %, expected (%,) cut in tiles of % like weight "%"',
          rb.name, llm_shape_text(rb.shape), rb.tile, v_n, v_tn, rw.name
          USING HINT = format('Store the bias with tile ARRAY[1, %s].', v_tn);
      END IF;
    END IF;
    IF p_residual IS NOT NULL THEN
      rr := llm_input(p_residual, 'linear', 'residual');
      IF llm_rows(rr.shape) <> v_m OR llm_cols(rr.shape) <> v_n OR least(rr.tile[1], v_m) <> v_tm
         OR least(rr.tile[2], v_n) <> v_tn THEN
        RAISE EXCEPTION 'pg_llm: linear: residual "%" has shape % tile %, expected (%, %) tile {%,%} like the output',
          rr.name, llm_shape_text(rr.shape), rr.tile, v_m, v_n, v_tm, v_tn;
      END IF;
    END IF;
    IF p_out IN (p_x, p_w, p_b, p_residual) OR p_pre IN (p_x, p_w, p_b, p_residual) OR p_pre = p_out THEN
      RAISE EXCEPTION 'pg_llm: linear: output tensors (out %, pre %) must differ from the inputs and each other',
        p_out, p_pre;
    END IF;
"""


def _forward() -> str:
    body = plpgsql("""
        rx llm_tensor; rw llm_tensor; rb llm_tensor; rr llm_tensor;
        v_m INT; v_k INT; v_n INT; v_tm INT; v_tk INT; v_tn INT; v_out BIGINT; v_written BIGINT; v_want BIGINT;
        v_budget BIGINT; v_pi INT; v_pj INT; v_ni INT; v_nj INT; v_gx INT[]; v_gw INT[];
    """, CHECKS + f"""
        v_out := llm_output(p_out, 'linear', ARRAY[v_m, v_n], ARRAY[v_tm, v_tn], p_accumulate);
        IF p_pre IS NOT NULL THEN
          PERFORM llm_output(p_pre, 'linear', ARRAY[v_m, v_n], ARRAY[v_tm, v_tn], FALSE);
        END IF;
{PANELS}
        v_gx := ARRAY[v_m, v_k, v_tm, v_tk];
        v_gw := ARRAY[v_k, v_n, rw.tile[1], rw.tile[2]];  -- as stored: llm_matmul's weight-cache key
        @forward;
        GET DIAGNOSTICS v_written = ROW_COUNT;
        v_want := ((v_m + v_tm - 1) / v_tm) * ((v_n + v_tn - 1) / v_tn) * (1 + (p_pre IS NOT NULL)::INT);
        IF v_written <> v_want THEN
          RAISE EXCEPTION 'pg_llm: linear: wrote % of the % output tiles', v_written, v_want;
        END IF;
        RETURN v_out;
    """, forward=FORWARD)
    return function(
        "llm_linear",
        "p_x BIGINT, p_w BIGINT, p_b BIGINT DEFAULT NULL, p_gelu BOOLEAN DEFAULT FALSE, p_out BIGINT DEFAULT NULL, "
        "p_accumulate BOOLEAN DEFAULT FALSE, p_pre BIGINT DEFAULT NULL, p_residual BIGINT DEFAULT NULL", "BIGINT",
        body, settings=KERNEL_SETTINGS,
        note="""op: linear forward (fused). x (m, k) @ W (k, n) + b (n,) [then GELU, tanh form] [+ residual (m, n)]
        -> out (m, n); p_b NULL: no bias. p_pre (an existing tensor, optional) also receives x @ W + b.
        tiling: out tiles (x's tile rows, W's tile cols), b cut like W's columns; one llm_mk_linear_panel call
        per output panel (matmul's panels). p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def _backward() -> str:
    body = plpgsql("", """
        PERFORM llm_matmul(p_dy, p_w, p_dx, FALSE, TRUE, p_accumulate) WHERE p_dx IS NOT NULL;
        PERFORM llm_matmul(p_x, p_dy, p_dw, TRUE, FALSE, p_accumulate) WHERE p_dw IS NOT NULL;
        PERFORM llm_sum_rows(p_dy, p_db, p_accumulate) WHERE p_db IS NOT NULL;
    """)
    return function(
        "llm_linear_backward",
        "p_x BIGINT, p_w BIGINT, p_dy BIGINT, p_dx BIGINT, p_dw BIGINT, p_db BIGINT, p_accumulate BOOLEAN DEFAULT TRUE",
        "VOID", body, settings=KERNEL_SETTINGS,
        note="""op: linear backward for y = x @ W + b (after the GELU backward when there is one): dx = dy @ W^T,
        dW = x^T @ dy, db = column sums of dy, written (or accumulated) into existing tensors; NULL skips one.""")


def _panel_kernel() -> str:
    return function(
        "llm_mk_linear_panel", "x BIGINT, x_geom INT[], i INT, pi INT, wt_id BIGINT, w_geom INT[], j INT, pj INT, "
        "b BIGINT, gelu BOOLEAN, pre BOOLEAN, res BIGINT", "TABLE(k INT, tr INT, tc INT, data BYTEA)",
        kernel_body(panel_kernel, "panel_kernel(plpy, GD, x, x_geom, i, pi, wt_id, w_geom, j, pj, b, gelu, pre, res)"),
        language="plpython3u", volatility="STABLE",
        note="""linear panel kernel: output panel (i, j) of act(x @ W + b) as (k, tr, tc, data) rows (k = 1: the
        pre-activation, when pre). It reads panel i (pi tile rows) of x, panel j (pj tile cols) of W (a durable
        W's block from the backend's weight cache), of the bias b and of the residual res (NULL: none) itself;
        geom = [rows, cols, tile_rows, tile_cols]. numpy: pg_llm.kernels.linear.""")


LIKE = """
    SELECT llm_tensor_create('linear_out', ARRAY[llm_rows(x.shape), llm_cols(w.shape)],
                             ARRAY[least(x.tile[1], llm_rows(x.shape)), least(w.tile[2], llm_cols(w.shape))])
    FROM llm_tensor AS x, llm_tensor AS w WHERE x.id = p_x AND w.id = v_w"""


def _wrapper() -> str:
    lin = {"x": "p_x", "w": "v_w", "b": "v_b"}
    body = plpgsql("v_w BIGINT; v_b BIGINT; v_pre BIGINT; v_lin BIGINT; v_out BIGINT;", f"""
        v_w := llm_param(p_model, p_prefix || '.weight');
        v_b := llm_param(p_model, p_prefix || '.bias');
        IF p_residual IS NOT NULL AND p_dropout = 0 AND NOT (p_gelu AND p_tape IS NOT NULL) THEN
          -- r + act(x @ W + b) in one kernel, recorded as linear + add
          v_lin := (
            @like
          );
          v_out := llm_linear(p_x, v_w, v_b, p_gelu, p_residual => p_residual);
          PERFORM {OP.record("v_lin", lin)};
          RETURN {op("add").record("v_out", {"a": "p_residual", "b": "v_lin"})};
        END IF;
        IF p_gelu AND p_tape IS NOT NULL THEN  -- the GELU backward needs x @ W + b: written to v_pre as well
          v_pre := (
            @like
          );
          v_out := llm_linear(p_x, v_w, v_b, TRUE, p_pre => v_pre);
          PERFORM {OP.record("v_pre", lin)};
          v_out := {op("gelu").record("v_out", {"x": "v_pre"})};
        ELSE
          v_out := {OP.record("llm_linear(p_x, v_w, v_b, p_gelu)", lin)};
        END IF;
        v_out := llm_t_dropout(p_tape, v_out, p_dropout, p_seed);
        IF p_residual IS NOT NULL THEN
          v_out := llm_t_add(p_tape, p_residual, v_out);
        END IF;
        RETURN v_out;
    """, like=LIKE)
    return function("llm_t_linear", "p_tape BIGINT, p_x BIGINT, p_model TEXT, p_prefix TEXT, "
                    "p_gelu BOOLEAN DEFAULT FALSE, p_residual BIGINT DEFAULT NULL, p_dropout FLOAT8 DEFAULT 0, "
                    "p_seed BIGINT DEFAULT 0", "BIGINT", body, settings=KERNEL_SETTINGS,
                    note="""Recording wrapper: GPT-2 Conv1D [r +] dropout(act(x @ weight [in, out] + bias)) with
                    fused llm_linear calls. Recorded as 'linear' [+ 'gelu' from a saved pre-activation] [+ 'dropout']
                    [+ 'add']; with a residual and no dropout the add is fused too and 'linear' records an empty
                    stand-in for its output (backward only needs its gradient).""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _panel_kernel(), _forward(), _backward(), _wrapper()])
