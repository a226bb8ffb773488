"""linear: GPT-2's fused Conv1D layer y = act(x @ W + b) [+ r], act = identity or GELU (tanh form), one kernel.

Forward:  y = x @ W + b                  llm_linear(x, W, b)
          y = gelu(x @ W + b)            llm_linear(x, W, b, p_gelu => TRUE)
          y = r + (x @ W + b)            llm_linear(x, W, b, p_residual => r)   (the residual add of a block)
          (p_pre: an existing tensor that also receives x @ W + b, the input of the GELU backward)
Backward: dx = dy @ W^T, dW = x^T @ dy, db = column sums of dy
                                         llm_linear_backward(x, W, dy, dx, dW, db)  (llm_matmul, llm_sum_rows)

Same numbers as the unfused chain llm_gelu(llm_add_bias(llm_matmul(x, W), b)): the product of one panel is the
same np.matmul over the same blocks as llm_matmul's panel kernel, the bias is added in float32 like
llm_mk_add_bias, the GELU is gelu.py's gelu_tile applied to each output tile and the residual is added to
each tile like llm_mk_add. What it saves: the matmul output, the biased output and the branch before the
residual add are never written to llm_tile nor read back (full activation writes, ~20 % of a forward at
T=1024), and two or three kernel calls per layer.

Tiling (matmul's panel form): x (R, K) tiles (th, tk), W (K, N) tiles (tk, tn), b (N,) one row of tiles
(1, tn); out (R, N) and r tiles (th, tn). Each output panel is ONE PL/Python call (llm_mk_linear_panel) that
reads x's block rows, W's block columns and the bias (and residual) tiles of the panel itself, with at most
PANEL_FLOATS floats of each operand and of the output (setting pg_llm.matmul_panel_floats, as llm_matmul).
"""
from __future__ import annotations

import inspect
import textwrap

from pg_llm.gen.emit import _BOOT, comment, function, plpgsql
from pg_llm.ops import weight_cache
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT
from pg_llm.ops.gelu import gelu_tile
from pg_llm.ops.matmul import PANELS, block_matrix

SQL_FILE = "kernels/linear.sql"
ORDER = 15


# ---- numpy (unit-tested without a server) -------------------------------------------------------------------

def linear_blocks(np, x, w, i0, j0, th, tn, bias_tiles, gelu, pre, res_tiles=()):
    """Output tiles (k, tr, tc, bytes) of one panel of act(x @ w + b) [+ r], x and w the assembled blocks (x: the
    panel's rows, every column; w: every row, the panel's columns), the panel's first output tile (i0, j0) and
    output tiles (th, tn): k = 0 the output, k = 1 the pre-activation x @ w + b (only when pre). bias_tiles: the
    bias tiles of the panel's columns (empty: no bias); res_tiles: the residual's tiles of the panel in (tr, tc)
    order (empty: none)."""
    if x.shape[1] != w.shape[0]:
        plpy.error('pg_llm: linear: x block %s and W block %s' % (x.shape, w.shape))  # noqa: F821
    y = np.matmul(x, w)
    if bias_tiles:
        b = np.frombuffer(b''.join(bias_tiles), dtype='<f4')
        if b.size != y.shape[1]:
            plpy.error('pg_llm: linear: %d bias values for %d output columns' % (b.size, y.shape[1]))  # noqa: F821
        y += b
    if res_tiles and len(res_tiles) != (-(-y.shape[0] // th)) * (-(-y.shape[1] // tn)):
        plpy.error('pg_llm: linear: %d residual tiles for a %d x %d panel'  # noqa: F821
                   % (len(res_tiles), y.shape[0], y.shape[1]))
    res = iter(res_tiles)
    for r in range(0, y.shape[0], th):
        for c in range(0, y.shape[1], tn):
            t = y[r:r + th, c:c + tn].tobytes()
            if pre:
                yield 1, i0 + r // th, j0 + c // tn, t
            if gelu:
                t = gelu_tile(np, t)
            if res_tiles:
                t = (np.frombuffer(next(res), dtype='<f4') + np.frombuffer(t, dtype='<f4')).tobytes()
            yield 0, i0 + r // th, j0 + c // tn, t


def read_tiles(plpy, GD, tensor_id, box):
    """Payloads of the tiles box = [r0, r1, c0, c1] (half-open) of a tensor in (tr, tc) order (one cached plan)."""
    plan = GD.get('llm_linear_plan')
    if plan is None:
        plan = GD['llm_linear_plan'] = plpy.prepare(
            'SELECT data FROM llm_tile WHERE tensor_id = $1 AND tr >= $2 AND tr < $3 AND tc >= $4 AND tc < $5 '
            'ORDER BY tr, tc', ['bigint', 'int', 'int', 'int', 'int'])
    return [r['data'] for r in plpy.execute(plan, [tensor_id] + list(box))]


# W's block comes from the backend's weight cache (weight_cache.py) when W is durable, under the key llm_matmul's
# panels use for it (stored geometry, tile box), so both kernels share one entry.
PANEL_CALL = """
rows, k, th, tk = x_geom
n, tn = w_geom[1], w_geom[3]
nk = -(-k // tk)
xb = [i * pi, min((i + 1) * pi, -(-rows // th)), 0, nk]
wb = [0, -(-k // w_geom[2]), j * pj, min((j + 1) * pj, -(-n // tn))]
xm = block_matrix(np, read_tiles(plpy, GD, x, xb), list(x_geom) + xb)
budget = cache_budget(plpy, GD) if wt_id > 0 else 0
if budget:
    wm = cached_block(plpy, GD, wt_id, w_geom, wb, lambda t: block_matrix(np, t, list(w_geom) + wb), budget)
else:
    wm = block_matrix(np, read_tiles(plpy, GD, wt_id, wb), list(w_geom) + wb)
bt = read_tiles(plpy, GD, b, [0, 1, wb[2], wb[3]]) if b is not None else []
rt = read_tiles(plpy, GD, res, [xb[0], xb[1], wb[2], wb[3]]) if res is not None else []
return linear_blocks(np, xm, wm, xb[0], wb[2], th, tn, bt, gelu, pre, rt)"""


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
    src = "\n".join([weight_cache.source()] + [textwrap.dedent(inspect.getsource(f)).strip()
                                                for f in (gelu_tile, block_matrix, linear_blocks, read_tiles)])
    return function(
        "llm_mk_linear_panel", "x BIGINT, x_geom INT[], i INT, pi INT, wt_id BIGINT, w_geom INT[], j INT, pj INT, "
        "b BIGINT, gelu BOOLEAN, pre BOOLEAN, res BIGINT", "TABLE(k INT, tr INT, tc INT, data BYTEA)",
        f"{_BOOT}\n{src}{PANEL_CALL}", language="plpython3u", volatility="STABLE",
        note="""linear panel kernel: output panel (i, j) of act(x @ W + b) as (k, tr, tc, data) rows (k = 1: the
        pre-activation, when pre). It reads panel i (pi tile rows) of x, panel j (pj tile cols) of W (a durable
        W's block from the backend's weight cache), of the bias b and of the residual res (NULL: none) itself;
        geom = [rows, cols, tile_rows, tile_cols]. numpy part: linear_blocks.""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _panel_kernel(), _forward(), _backward()])
