"""softmax_causal: P = softmax(scale * S) per row, causally masked per attention head.

Forward:  P = llm_softmax_causal(S, T, scale)        S (H*T, T): heads (and sequences of a batch) stacked along
                                                     rows; row r is query position r mod T and attends to
                                                     columns 0..(r mod T); masked positions get exactly 0.
          llm_softmax_causal(S, NULL, p_causal => FALSE)  a plain row softmax of any (R, C).
Backward: dS = llm_softmax_causal_backward(P, dP, scale) = P * (dP - rowsum(dP * P)) * scale (masked entries
          have P = 0, hence dS = 0: the mask needs no second look).

Tiling: the output has S's tile. One microkernel call per tile-row block of S (array_agg(data ORDER BY tc)
GROUP BY tr) returns the block's output tiles as bytea[], unnested WITH ORDINALITY into (tr, tc); the block's
first row (tr * tile_rows) gives each row's query position. The numpy microkernels: py/kernels/softmax.py.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.softmax import softmax_backward_block, softmax_block
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT

SQL_FILE = "kernels/softmax.sql"
ORDER = 21


FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, b.tr, o.k - 1, o.data
    FROM (
      SELECT t.tr, array_agg(t.data ORDER BY t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_s GROUP BY t.tr
    ) AS b
    CROSS JOIN LATERAL unnest(llm_mk_softmax(b.tiles, llm_tile_dim(v_rows, v_th, b.tr), v_cols, b.tr * v_th,
                                             coalesce(p_seq_len, v_cols), p_scale, p_causal))
      WITH ORDINALITY AS o(data, k)
    WHERE TRUE
    """ + UPSERT


def _forward() -> str:
    body = plpgsql("""
        v_op TEXT := 'softmax_causal';
        rs llm_tensor; v_rows INT; v_cols INT; v_th INT; v_out BIGINT;
    """, """
        rs := llm_input(p_s, v_op, 's');
        v_rows := llm_rows(rs.shape); v_cols := llm_cols(rs.shape); v_th := rs.tile[1];
        IF p_causal IS NULL OR p_scale IS NULL THEN
          RAISE EXCEPTION 'pg_llm: %: p_causal and p_scale must not be NULL', v_op;
        END IF;
        IF p_causal AND p_seq_len IS NULL THEN
          RAISE EXCEPTION 'pg_llm: %: a causal softmax needs p_seq_len (T) for scores "%" %', v_op, rs.name,
            llm_shape_text(rs.shape) USING HINT = 'Scores are (H*T, T); pass p_causal => FALSE for a plain softmax.';
        END IF;
        IF v_cols <> coalesce(p_seq_len, v_cols) OR (p_causal AND v_rows % greatest(p_seq_len, 1) <> 0) THEN
          RAISE EXCEPTION 'pg_llm: %: scores "%" have shape %, expected (H*T, T) with T = %',
            v_op, rs.name, llm_shape_text(rs.shape), p_seq_len
            USING HINT = 'Heads (and sequences) are stacked along rows; row r is query position r mod T.';
        END IF;
        v_out := llm_output(p_out, v_op, rs.shape, rs.tile, p_accumulate);
        @forward;
        RETURN v_out;
    """, forward=FORWARD)
    return function(
        "llm_softmax_causal",
        "p_s BIGINT, p_seq_len INT, p_scale FLOAT8 DEFAULT 1.0, p_out BIGINT DEFAULT NULL, "
        "p_causal BOOLEAN DEFAULT TRUE, p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""
        op: softmax_causal forward. S (H*T, T) -> P (H*T, T) = softmax(scale * S) per row, row r (query r mod T)
        masked to columns 0..(r mod T) (masked P exactly 0); p_causal FALSE: plain row softmax of any (R, C).
        tiling: P has S's tile; one llm_mk_softmax call per tile-row block. p_out NULL allocates a scratch tensor.""")


BACKWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, b.tr, o.k - 1, o.data
    FROM (
      SELECT t.tr, array_agg(t.data ORDER BY t.tc) FILTER (WHERE t.tensor_id = p_p) AS ps,
             array_agg(t.data ORDER BY t.tc) FILTER (WHERE t.tensor_id = p_dp) AS dps
      FROM llm_tile AS t WHERE t.tensor_id IN (p_p, p_dp) GROUP BY t.tr
    ) AS b
    CROSS JOIN LATERAL unnest(llm_mk_softmax_backward(b.ps, b.dps, llm_tile_dim(v_rows, v_th, b.tr), v_cols,
                                                      p_scale)) WITH ORDINALITY AS o(data, k)
    WHERE TRUE
    """ + UPSERT


def _backward() -> str:
    body = plpgsql("""
        v_op TEXT := 'softmax_causal_backward';
        rp llm_tensor; rdp llm_tensor; v_rows INT; v_cols INT; v_th INT; v_out BIGINT;
    """, """
        rp := llm_input(p_p, v_op, 'p');
        rdp := llm_input(p_dp, v_op, 'dp');
        v_rows := llm_rows(rp.shape); v_cols := llm_cols(rp.shape); v_th := rp.tile[1];
        IF p_scale IS NULL THEN
          RAISE EXCEPTION 'pg_llm: %: p_scale must not be NULL', v_op;
        END IF;
        IF llm_rows(rdp.shape) <> v_rows OR llm_cols(rdp.shape) <> v_cols OR rdp.tile <> rp.tile THEN
          RAISE EXCEPTION 'pg_llm: %: dp "%" has shape % tile %, expected shape % tile % like p "%"',
            v_op, rdp.name, llm_shape_text(rdp.shape), rdp.tile, llm_shape_text(rp.shape), rp.tile, rp.name;
        END IF;
        v_out := llm_output(p_out, v_op, rp.shape, rp.tile, p_accumulate);
        @backward;
        RETURN v_out;
    """, backward=BACKWARD)
    return function(
        "llm_softmax_causal_backward",
        "p_p BIGINT, p_dp BIGINT, p_scale FLOAT8 DEFAULT 1.0, p_out BIGINT DEFAULT NULL, "
        "p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""
        op: softmax_causal backward for P = softmax(scale * S) (causal or not). P, dP (R, C) -> dS (R, C) =
        P * (dP - rowsum(dP * P)) * scale. tiling: dS has P's tile (dP must match); one llm_mk_softmax_backward
        call per tile-row block. p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def emit() -> str:
    mk = microkernel(
        "llm_mk_softmax",
        "s_tiles BYTEA[], rows INT, cols INT, first_row INT, seq_len INT, scale FLOAT8, causal BOOLEAN", "BYTEA[]",
        softmax_block,
        note="""
        softmax microkernel: one tile-row block of S (rows x cols, tiles ordered by column, first global row
        first_row) -> the block's tiles of softmax(scale * S), row r masked to columns <= r mod seq_len if causal.""")
    mkb = microkernel(
        "llm_mk_softmax_backward", "p_tiles BYTEA[], dp_tiles BYTEA[], rows INT, cols INT, scale FLOAT8", "BYTEA[]",
        softmax_backward_block,
        note="""
        softmax backward microkernel: one tile-row block of P and dP (rows x cols) -> the block's tiles of
        dS = P * (dP - rowsum(dP * P)) * scale, in column order.""")
    return "\n".join([comment(__doc__ or ""), mk, mkb, _forward(), _backward()])
