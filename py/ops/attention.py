"""attention: GPT-2's causal multi-head self-attention core, fused (scores, mask, softmax, weighted sum).

Forward:  qkv (B*T, 3C) -> y (B*T, C); per sequence b and head h:
          y_bh = softmax(q_bh k_bh^T / sqrt(hd) + causal mask) v_bh,  hd = C / n_head
Backward: dqkv from dy, recomputing the probabilities (nothing saved but qkv).

Tiling: attention mixes every row of a sequence and every column of a head, so one microkernel call
receives all tiles of qkv (ordered by (tr, tc)), reassembles the matrix, and returns y's tiles (same tile
shape as qkv, capped by C). Rows of a batch are B sequences of T tokens each, stacked.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "kernels/attention.sql"
ORDER = 30


def attention_forward(np, tiles, rows, cols, th, tw, n_head, seq_len, rate, seed):
    """y tiles (row-major tile order, tile th x min(tw, C)) of causal attention over qkv's tiles.
    rate > 0 applies inverted dropout to the probabilities with a mask drawn from `seed` (backward redraws it)."""
    f = '<f4'
    ntc = -(-cols // tw)
    qkv = np.vstack([np.hstack([np.frombuffer(tiles[r * ntc + c], dtype=f).reshape(min(th, rows - r * th), -1)
                                for c in range(ntc)]) for r in range(-(-rows // th))])
    C = cols // 3
    hd = C // n_head
    B = rows // seq_len
    x = qkv.reshape(B, seq_len, 3, n_head, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    q, k, v = x[0], x[1], x[2]
    att = np.matmul(q, k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(hd))
    att = np.where(np.tril(np.ones((seq_len, seq_len), dtype=bool)), att, np.float32(-np.inf))
    att = np.exp(att - att.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    if rate > 0:
        keep = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).random(att.shape) >= rate
        att = att * keep * np.float32(1.0 / (1.0 - rate))
    y = np.matmul(att, v).transpose(0, 2, 1, 3).reshape(rows, C)
    otw = min(tw, C)
    return [np.ascontiguousarray(y[r:r + th, c:c + otw], dtype=f).tobytes()
            for r in range(0, rows, th) for c in range(0, C, otw)]


def attention_backward(np, tiles, dy_tiles, rows, cols, th, tw, n_head, seq_len, rate, seed):
    """dqkv tiles (qkv's tiling) given qkv's tiles and dy's tiles (tile th x min(tw, C)); the dropout mask
    of the forward is redrawn from the same seed."""
    f = '<f4'
    C = cols // 3
    otw = min(tw, C)

    def assemble(ts, ncols, w):
        n = -(-ncols // w)
        return np.vstack([np.hstack([np.frombuffer(ts[r * n + c], dtype=f).reshape(min(th, rows - r * th), -1)
                                     for c in range(n)]) for r in range(-(-rows // th))])

    qkv = assemble(tiles, cols, tw).astype(np.float64)
    dy = assemble(dy_tiles, C, otw).astype(np.float64)
    hd = C // n_head
    B = rows // seq_len
    x = qkv.reshape(B, seq_len, 3, n_head, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = x[0], x[1], x[2]
    scale = 1.0 / np.sqrt(hd)
    s = np.matmul(q, k.transpose(0, 1, 3, 2)) * scale
    s = np.where(np.tril(np.ones((seq_len, seq_len), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dyh = dy.reshape(B, seq_len, n_head, hd).transpose(0, 2, 1, 3)
    drop = 1.0
    if rate > 0:
        keep = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).random(p.shape) >= rate
        drop = keep / (1.0 - rate)
    dv = np.matmul((p * drop).transpose(0, 1, 3, 2), dyh)
    dp = np.matmul(dyh, v.transpose(0, 1, 3, 2)) * drop
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
    dq = np.matmul(ds, k)
    dk = np.matmul(ds.transpose(0, 1, 3, 2), q)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(rows, cols)
    return [np.ascontiguousarray(dqkv[r:r + th, c:c + tw], dtype=f).tobytes()
            for r in range(0, rows, th) for c in range(0, cols, tw)]


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

FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, (o.n - 1) / v_ntc, (o.n - 1) % v_ntc, o.data
    FROM (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_qkv
    ) AS g
    CROSS JOIN LATERAL unnest(llm_mk_attention(g.tiles, v_rows, v_cols, r.tile[1], r.tile[2], p_n_head,
                                               p_seq_len, p_dropout, p_seed)) WITH ORDINALITY AS o(data, n)
"""

BACKWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, (o.n - 1) / v_ntc, (o.n - 1) % v_ntc, o.data
    FROM (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_qkv
    ) AS g
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
                      "attention_forward(np, tiles, rows, cols, th, tw, n_head, seq_len, rate, seed)",
                      note="attention microkernel: causal multi-head attention of one qkv matrix given as tiles.")
    bwd = microkernel("llm_mk_attention_backward", "tiles BYTEA[], dy_tiles BYTEA[], rows INT, cols INT, th INT, "
                      "tw INT, n_head INT, seq_len INT, rate FLOAT8, seed BIGINT", "BYTEA[]", attention_backward,
                      "attention_backward(np, tiles, dy_tiles, rows, cols, th, tw, n_head, seq_len, rate, seed)",
                      note="attention backward microkernel: dqkv tiles from qkv and dy tiles.")
    return "\n".join([comment(__doc__ or ""), fwd, bwd, _forward(), _backward()])
