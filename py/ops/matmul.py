"""matmul: C = op(A) @ op(B), op = identity or transpose.

Forward:  y = x @ W                      (llm_matmul(x, W))
          logits = x @ wte^T             (tied output projection: tb => true)
Backward: dx = dy @ W^T                  (llm_matmul(dy, W, tb => true))
          dW = x^T @ dy                  (llm_matmul(x, dy, ta => true, accumulate => true))

Tiling: output tile (i, j) = one microkernel call that receives the ordered array_agg of op(A)'s block row i
and op(B)'s block column j (the whole K reduction happens in numpy). K must be cut the same way in A and B.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT

SQL_FILE = "kernels/matmul.sql"
ORDER = 10


def matmul_tile(np, a_tiles, b_tiles, m, n, ta, tb):
    """One output tile (m x n) of op(A) @ op(B) from A's and B's tiles ordered along K."""
    f = '<f4'
    if ta:
        a = np.vstack([np.frombuffer(t, dtype=f).reshape(-1, m) for t in a_tiles]).T
    else:
        a = np.hstack([np.frombuffer(t, dtype=f).reshape(m, -1) for t in a_tiles])
    if tb:
        b = np.hstack([np.frombuffer(t, dtype=f).reshape(n, -1) for t in b_tiles]).T
    else:
        b = np.vstack([np.frombuffer(t, dtype=f).reshape(-1, n) for t in b_tiles])
    return np.matmul(a, b, dtype=np.float32).tobytes()


FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, a.i, b.j,
           llm_mk_matmul(a.tiles, b.tiles, llm_tile_dim(v_m, v_tm, a.i), llm_tile_dim(v_n, v_tn, b.j), p_ta, p_tb)
    FROM (
      SELECT CASE WHEN p_ta THEN t.tc ELSE t.tr END AS i,
             array_agg(t.data ORDER BY CASE WHEN p_ta THEN t.tr ELSE t.tc END) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_a GROUP BY 1
    ) AS a
    CROSS JOIN (
      SELECT CASE WHEN p_tb THEN t.tr ELSE t.tc END AS j,
             array_agg(t.data ORDER BY CASE WHEN p_tb THEN t.tc ELSE t.tr END) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_b GROUP BY 1
    ) AS b
    WHERE TRUE
    """ + UPSERT  # WHERE TRUE keeps sqlglot from reading ON CONFLICT as a join condition


def _forward() -> str:
    body = plpgsql("""
        ra llm_tensor; rb llm_tensor;
        v_m INT; v_k INT; v_kb INT; v_n INT; v_tm INT; v_tk INT; v_tkb INT; v_tn INT; v_out BIGINT;
    """, """
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
        @forward;
        RETURN v_out;
    """, forward=FORWARD)
    return function(
        "llm_matmul",
        "p_a BIGINT, p_b BIGINT, p_out BIGINT DEFAULT NULL, p_ta BOOLEAN DEFAULT FALSE, "
        "p_tb BOOLEAN DEFAULT FALSE, p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""op: matmul forward. op(A) (m, k) @ op(B) (k, n) -> out (m, n), op = transpose when p_ta/p_tb.
        tiling: out tile (i, j) = llm_mk_matmul(block row i of op(A), block column j of op(B)); out tile is
        (A's m-tile, B's n-tile). p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def _backward() -> str:
    body = plpgsql("", """
        PERFORM llm_matmul(p_dy, p_b, p_da, FALSE, TRUE, p_accumulate) WHERE p_da IS NOT NULL;
        PERFORM llm_matmul(p_a, p_dy, p_db, TRUE, FALSE, p_accumulate) WHERE p_db IS NOT NULL;
    """)
    return function(
        "llm_matmul_backward",
        "p_a BIGINT, p_b BIGINT, p_dy BIGINT, p_da BIGINT, p_db BIGINT, p_accumulate BOOLEAN DEFAULT TRUE",
        "VOID", body, settings=KERNEL_SETTINGS,
        note="""op: matmul backward for y = a @ b. da = dy @ b^T (m, k), db = a^T @ dy (k, n), each written
        (or accumulated) into an existing tensor; pass NULL to skip one.""")


def emit() -> str:
    mk = microkernel("llm_mk_matmul", "a_tiles BYTEA[], b_tiles BYTEA[], m INT, n INT, ta BOOLEAN, tb BOOLEAN",
                     "BYTEA", matmul_tile, "matmul_tile(np, a_tiles, b_tiles, m, n, ta, tb)",
                     note="matmul microkernel: one (m, n) output tile from op(A)'s block row and op(B)'s block column.")
    return "\n".join([comment(__doc__ or ""), mk, _forward(), _backward()])
