"""attention: GPT-2's causal multi-head self-attention core, fused (scores, mask, softmax, weighted sum).

Forward:  qkv (B*T, 3C) -> y (B*T, C); per sequence b and head h:
          y_bh = softmax(q_bh k_bh^T / sqrt(hd) + causal mask) v_bh,  hd = C / n_head
Backward: dqkv from dy, recomputing the probabilities (nothing saved but qkv).

Tiling: attention mixes every row of a sequence and every column of a head, so one microkernel call
receives all tiles of qkv (ordered by (tr, tc)), reassembles the matrix, and returns y's tiles (same tile
shape as qkv, capped by C). Rows of a batch are B sequences of T tokens each, stacked. The numpy
microkernels: py/kernels/attention.py.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.attention import attention_backward, attention_forward
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "kernels/attention.sql"
ORDER = 30

OP = Op("attention", ("qkv",), args=(("n_head", "INT"), ("seq_len", "INT"), ("dropout", "FLOAT8"), ("seed", "BIGINT")),
        wrapper="p_qkv BIGINT, p_n_head INT, p_seq_len INT, p_dropout FLOAT8, p_seed BIGINT",
        kernel="llm_attention(p_qkv, p_n_head, p_seq_len, NULL, p_dropout, p_seed)",
        note="out = attn(qkv); dqkv (probabilities and dropout mask recomputed)", backward="""
        acc({qkv}, llm_attention_backward({qkv}, {g}, {n_head}, {seq_len}, NULL, FALSE, {dropout}, {seed}));""")


CHECKS = """
    r := llm_input(p_qkv, 'attention', 'qkv');
    v_rows := llm_rows(r.shape); v_cols := llm_cols(r.shape);
    IF v_cols % 3 <> 0 OR p_n_head < 1 OR (v_cols / 3) % p_n_head <> 0 THEN
      RAISE EXCEPTION 'pg_llm: attention: qkv "%" has % columns: need 3 * C with C divisible by n_head = %',
        r.name, v_cols, p_n_head;
    END IF;
    IF p_seq_len < 1 OR v_rows % p_seq_len <> 0 THEN
      RAISE EXCEPTION 'pg_llm: attention: qkv "%" has % rows, not a whole number of sequences of %',
        r.name, v_rows, p_seq_len USING HINT = 'Rows are B sequences of T tokens stacked: B * T.';
    END IF;
    v_otile := ARRAY[r.tile[1], least(r.tile[2], v_cols / 3)];
    IF p_dropout IS NULL OR p_dropout < 0 OR p_dropout >= 1 OR p_seed IS NULL OR p_seed < 0 THEN
      RAISE EXCEPTION 'pg_llm: attention: dropout must be in [0, 1) and seed >= 0, got % and %', p_dropout, p_seed;
    END IF;
"""

# every tile of qkv in one array (the kernel assembles the whole matrix), then the kernel's tiles in order
GATHER = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, (o.n - 1) / v_ntc, (o.n - 1) % v_ntc, o.data
    FROM (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_qkv
    ) AS g
"""

FORWARD = GATHER + """
    CROSS JOIN LATERAL unnest(llm_mk_attention(g.tiles, v_rows, v_cols, r.tile[1], r.tile[2], p_n_head,
                                               p_seq_len, p_dropout, p_seed)) WITH ORDINALITY AS o(data, n)
"""

BACKWARD = GATHER + """
    CROSS JOIN (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_dy
    ) AS d
    CROSS JOIN LATERAL unnest(llm_mk_attention_backward(g.tiles, d.tiles, v_rows, v_cols, r.tile[1], r.tile[2],
                                                        p_n_head, p_seq_len, p_dropout, p_seed))
      WITH ORDINALITY AS o(data, n)
    WHERE TRUE
    ON CONFLICT (tensor_id, tr, tc) DO UPDATE SET data = llm_mk_add(llm_tile.data, excluded.data)
"""


def _forward() -> str:
    body = plpgsql("r llm_tensor; v_rows INT; v_cols INT; v_otile INT[]; v_ntc INT; v_out BIGINT;", CHECKS + """
        v_out := llm_output(p_out, 'attention', ARRAY[v_rows, v_cols / 3], v_otile, FALSE);
        v_ntc := (v_cols / 3 + v_otile[2] - 1) / v_otile[2];
        @forward;
        RETURN v_out;
    """, forward=FORWARD)
    return function("llm_attention", "p_qkv BIGINT, p_n_head INT, p_seq_len INT, p_out BIGINT DEFAULT NULL, "
                    "p_dropout FLOAT8 DEFAULT 0, p_seed BIGINT DEFAULT 0",
                    "BIGINT", body, settings=KERNEL_SETTINGS,
                    note="""op: attention forward (causal, multi-head). qkv (B*T, 3C) -> y (B*T, C).
                    tiling: one llm_mk_attention call over all qkv tiles; y tiles are (qkv tile rows, min(tile
                    cols, C)).""")


def _backward() -> str:
    body = plpgsql("""
        r llm_tensor; rd llm_tensor; v_rows INT; v_cols INT; v_otile INT[]; v_ntc INT; v_out BIGINT;
    """, CHECKS + """
        rd := llm_input(p_dy, 'attention_backward', 'dy');
        IF llm_rows(rd.shape) <> v_rows OR llm_cols(rd.shape) <> v_cols / 3 OR rd.tile <> v_otile THEN
          RAISE EXCEPTION 'pg_llm: attention_backward: dy "%" has shape % tile %, expected (%, %) tile %',
            rd.name, llm_shape_text(rd.shape), rd.tile, v_rows, v_cols / 3, v_otile;
        END IF;
        v_out := llm_output(p_out, 'attention_backward', r.shape, r.tile, p_accumulate);
        v_ntc := (v_cols + r.tile[2] - 1) / r.tile[2];
        @backward;
        RETURN v_out;
    """, backward=BACKWARD)
    return function("llm_attention_backward",
                    "p_qkv BIGINT, p_dy BIGINT, p_n_head INT, p_seq_len INT, p_out BIGINT DEFAULT NULL, "
                    "p_accumulate BOOLEAN DEFAULT FALSE, p_dropout FLOAT8 DEFAULT 0, p_seed BIGINT DEFAULT 0",
                    "BIGINT", body, settings=KERNEL_SETTINGS,
                    note="""op: attention backward. qkv (B*T, 3C), dy (B*T, C) -> dqkv (B*T, 3C), recomputing
                    the probabilities in float64. tiling: one call over all tiles; dqkv has qkv's tiling.""")


def emit() -> str:
    fwd = microkernel("llm_mk_attention", "tiles BYTEA[], rows INT, cols INT, th INT, tw INT, n_head INT, "
                      "seq_len INT, rate FLOAT8, seed BIGINT", "BYTEA[]", attention_forward,
                      note="attention microkernel: causal multi-head attention of one qkv matrix given as tiles.")
    bwd = microkernel("llm_mk_attention_backward", "tiles BYTEA[], dy_tiles BYTEA[], rows INT, cols INT, th INT, "
                      "tw INT, n_head INT, seq_len INT, rate FLOAT8, seed BIGINT", "BYTEA[]", attention_backward,
                      note="attention backward microkernel: dqkv tiles from qkv and dy tiles.")
    return "\n".join([comment(__doc__ or ""), fwd, bwd, _forward(), _backward()])
