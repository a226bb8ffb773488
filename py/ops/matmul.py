"""matmul: C = op(A) @ op(B), op = identity or transpose.

Forward:  y = x @ W                      (llm_matmul(x, W))
          logits = x @ wte^T             (tied output projection: tb => true)
Backward: dx = dy @ W^T                  (llm_matmul(dy, W, tb => true))
          dW = x^T @ dy                  (llm_matmul(x, dy, ta => true, accumulate => true))

Tiling (panel form): the output is cut into panels of whole tiles; each panel is ONE PL/Python call
(llm_mk_matmul_panel) that reads every tile of op(A)'s block rows and op(B)'s block columns for that panel
(one cached SPI plan, in (tr, tc) order), assembles them, does one numpy matmul over the whole K and returns
the panel's output tiles. A panel holds at most PANEL_FLOATS floats of op(A), of op(B) and of the output
(32 MiB each; the setting pg_llm.matmul_panel_floats overrides it), so GPT-2 small's matmuls are one call
and the tied logits projection (x @ wte^T, 154 MB) a few. Reading the tiles in the kernel instead of passing
array_agg(data) saves the array's copy and zeroing (15-30 % of a call). `make bench` (kernels section)
compares it with one call per output tile, per-(i, k, j) partial products summed by llm_tile_sum, the
array_agg panel and numpy on the whole matrices. K must still be cut the same way in A and B (the panel
kernel itself does not need it).

Weight cache: a durable operand (id > 0: a model's weights) is not re-read per call. Its assembled panel block
is kept in the backend's GD and reused while the fingerprint of its tiles' row versions (tr, tc, tableoid,
relfilenode, ctid, xmin: no detoasting) is unchanged in the caller's snapshot, so an update, a rollback, a
rewrite or another session's commit is always seen (weight_cache.py explains why it is exact). Decoding
reads every weight per token, so this is what makes generation fast. pg_llm.weight_cache_mb bounds it (LRU;
0 disables). The numpy part: py/kernels/matmul.py.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, kernel_body, microkernel, plpgsql
from pg_llm.kernels.matmul import matmul_panel, matmul_tile, panel_kernel
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT

SQL_FILE = "kernels/matmul.sql"
ORDER = 10

OP = Op("matmul", ("a", "b"), args=(("ta", "BOOLEAN"), ("tb", "BOOLEAN")),
        wrapper="p_a BIGINT, p_b BIGINT, p_ta BOOLEAN DEFAULT FALSE, p_tb BOOLEAN DEFAULT FALSE",
        kernel="llm_matmul(p_a, p_b, NULL, p_ta, p_tb)",
        note="out = a @ op(b); da += g @ op(b)^T, db += a^T @ g (tb: db += g^T @ a)", backward="""
        IF {ta} THEN
          RAISE EXCEPTION 'pg_llm: backward: matmul with a transposed first operand is not recorded by any forward';
        END IF;
        da := like({a}, 'da');
        db := like({b}, 'db');
        PERFORM llm_matmul_backward({a}, {b}, {g}, da, db, FALSE, {tb});
        acc({a}, da);
        acc({b}, db);""")
PANEL_FLOATS = 8 * 1024 * 1024  # per operand and output panel (32 MiB of float32)
# PL/pgSQL of llm_matmul and llm_linear: panel geometry from v_m, v_k, v_n and the tiles v_tm, v_tn
PANELS = f"""
        -- panels: v_pi tiles of m by v_pj tiles of n, each operand and output panel <= v_budget floats
        v_budget := coalesce(nullif(current_setting('pg_llm.matmul_panel_floats', TRUE), '')::BIGINT, {PANEL_FLOATS});
        v_pi := greatest(1, least((v_m + v_tm - 1) / v_tm, v_budget / (v_tm::BIGINT * v_k)));
        v_pj := greatest(1, least((v_n + v_tn - 1) / v_tn,
                                  v_budget / (v_tn::BIGINT * greatest(v_k, least(v_m, v_pi * v_tm)))));
        v_ni := ((v_m + v_tm - 1) / v_tm + v_pi - 1) / v_pi;
        v_nj := ((v_n + v_tn - 1) / v_tn + v_pj - 1) / v_pj;
""".strip("\n")


FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, o.tr, o.tc, o.data
    FROM generate_series(0, v_ni - 1) AS pa(i)
    CROSS JOIN generate_series(0, v_nj - 1) AS pb(j)
    CROSS JOIN LATERAL llm_mk_matmul_panel(p_a, v_ga, p_ta, pa.i, v_pi, p_b, v_gb, p_tb, pb.j, v_pj) AS o
    WHERE TRUE
    """ + UPSERT  # WHERE TRUE keeps sqlglot from reading ON CONFLICT as a join condition


def forward_function(name: str, insert: str) -> str:
    """llm_matmul's PL/pgSQL (checks, output allocation, panel sizes) around one INSERT statement; the bench
    builds its alternative kernel forms with it. The INSERT sees p_*, v_m/v_k/v_n, the tiles v_tm/v_tk/v_tn,
    v_out, the panel sizes in tiles v_pi/v_pj, the panel counts v_ni/v_nj and v_ga/v_gb = ARRAY[rows, cols,
    tile_rows, tile_cols] of A and B as stored."""
    body = plpgsql("""
        ra llm_tensor; rb llm_tensor;
        v_m INT; v_k INT; v_kb INT; v_n INT; v_tm INT; v_tk INT; v_tkb INT; v_tn INT; v_out BIGINT;
        v_budget BIGINT; v_pi INT; v_pj INT; v_ni INT; v_nj INT; v_ga INT[]; v_gb INT[];
    """, f"""
        ra := llm_input(p_a, 'matmul', 'a');
        rb := llm_input(p_b, 'matmul', 'b');
        -- logical shapes of op(A) = (m, k) and op(B) = (k, n), and how each axis is tiled
        IF p_ta THEN v_m := llm_cols(ra.shape); v_k := llm_rows(ra.shape); v_tm := ra.tile[2]; v_tk := ra.tile[1];
        ELSE v_m := llm_rows(ra.shape); v_k := llm_cols(ra.shape); v_tm := ra.tile[1]; v_tk := ra.tile[2]; END IF;
        IF p_tb THEN v_n := llm_rows(rb.shape); v_kb := llm_cols(rb.shape); v_tn := rb.tile[1]; v_tkb := rb.tile[2];
        ELSE v_n := llm_cols(rb.shape); v_kb := llm_rows(rb.shape); v_tn := rb.tile[2]; v_tkb := rb.tile[1]; END IF;
        IF v_k <> v_kb THEN
          RAISE EXCEPTION 'pg_llm: matmul: inner dimensions differ: "%" % (transposed: %) and "%" % (transposed: %)',
            ra.name, llm_shape_text(ra.shape), p_ta, rb.name, llm_shape_text(rb.shape), p_tb
            USING HINT = 'op(a) must be (m, k) and op(b) (k, n).';
        END IF;
        IF v_tk <> v_tkb THEN
          RAISE EXCEPTION 'pg_llm: matmul: "%" and "%" cut the inner dimension % in tiles of % and %',
            ra.name, rb.name, v_k, v_tk, v_tkb USING HINT = 'Store both with the same tile size along k.';
        END IF;
        v_out := llm_output(p_out, 'matmul', ARRAY[v_m, v_n], ARRAY[v_tm, v_tn], p_accumulate);
{PANELS}
        v_ga := ARRAY[llm_rows(ra.shape), llm_cols(ra.shape), ra.tile[1], ra.tile[2]];
        v_gb := ARRAY[llm_rows(rb.shape), llm_cols(rb.shape), rb.tile[1], rb.tile[2]];
        @forward;
        RETURN v_out;
    """, forward=insert)
    return function(
        name,
        "p_a BIGINT, p_b BIGINT, p_out BIGINT DEFAULT NULL, p_ta BOOLEAN DEFAULT FALSE, "
        "p_tb BOOLEAN DEFAULT FALSE, p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""op: matmul forward. op(A) (m, k) @ op(B) (k, n) -> out (m, n), op = transpose when p_ta/p_tb.
        tiling: out tile is (A's m-tile, B's n-tile); one llm_mk_matmul_panel call per output panel (<= 32 MiB
        of op(A), op(B) and output each). p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def _backward() -> str:
    body = plpgsql("", """
        PERFORM llm_matmul(p_dy, p_b, p_da, FALSE, NOT p_tb, p_accumulate) WHERE p_da IS NOT NULL;
        IF p_tb THEN
          PERFORM llm_matmul(p_dy, p_a, p_db, TRUE, FALSE, p_accumulate) WHERE p_db IS NOT NULL;
        ELSE
          PERFORM llm_matmul(p_a, p_dy, p_db, TRUE, FALSE, p_accumulate) WHERE p_db IS NOT NULL;
        END IF;
    """)
    return function(
        "llm_matmul_backward",
        "p_a BIGINT, p_b BIGINT, p_dy BIGINT, p_da BIGINT, p_db BIGINT, p_accumulate BOOLEAN DEFAULT TRUE, "
        "p_tb BOOLEAN DEFAULT FALSE", "VOID", body, settings=KERNEL_SETTINGS,
        note="""op: matmul backward for y = a @ b: da = dy @ b^T (m, k), db = a^T @ dy (k, n); for y = a @ b^T
        (p_tb, the tied logits x @ wte^T): da = dy @ b, db = dy^T @ a (n, k). Each is written (or accumulated)
        into an existing tensor; pass NULL to skip one.""")


def _panel_kernel() -> str:
    return function(
        "llm_mk_matmul_panel", "a BIGINT, a_geom INT[], ta BOOLEAN, i INT, pi INT, "
        "b BIGINT, b_geom INT[], tb BOOLEAN, j INT, pj INT", "TABLE(tr INT, tc INT, data BYTEA)",
        kernel_body(panel_kernel, "panel_kernel(plpy, GD, a, a_geom, ta, i, pi, b, b_geom, tb, j, pj)"),
        language="plpython3u", volatility="STABLE", strict=True,
        note="""matmul panel kernel: output panel (i, j) of op(A) @ op(B) as (tr, tc, data) rows. It reads
        panel i (pi tiles along m) of tensor a and panel j (pj tiles along n) of tensor b itself (a durable
        operand's block from the backend's weight cache when its row versions are unchanged); geom =
        [rows, cols, tile_rows, tile_cols] as stored. numpy: pg_llm.kernels.matmul (unit-tested alone).""")


def panel_tiles_kernel(name: str, note: str) -> str:
    """A PL/Python function (a_tiles BYTEA[], a_geom INT[], ta, b_tiles BYTEA[], b_geom INT[], tb) -> output tiles:
    matmul_panel on tiles passed in (the bench's array_agg panel form)."""
    return function(name, "a_tiles BYTEA[], a_geom INT[], ta BOOLEAN, b_tiles BYTEA[], b_geom INT[], tb BOOLEAN",
                    "TABLE(tr INT, tc INT, data BYTEA)",
                    kernel_body(matmul_panel, "matmul_panel(a_tiles, a_geom, ta, b_tiles, b_geom, tb)"),
                    language="plpython3u", volatility="IMMUTABLE", strict=True, parallel="SAFE", note=note)


def emit() -> str:
    panel = _panel_kernel()
    mk = microkernel("llm_mk_matmul", "a_tiles BYTEA[], b_tiles BYTEA[], m INT, n INT, ta BOOLEAN, tb BOOLEAN",
                     "BYTEA", matmul_tile,
                     note="matmul microkernel: one (m, n) output tile from op(A)'s block row and op(B)'s block column "
                     "(not used by llm_matmul since the panel form; kept for other ops and the bench).")
    return "\n".join([comment(__doc__ or ""), panel, mk, forward_function("llm_matmul", FORWARD), _backward()])
