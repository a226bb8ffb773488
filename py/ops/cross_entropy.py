"""cross_entropy: mean negative log-likelihood of target ids under softmax(logits), logits (N, V).

Forward:  loss = llm_cross_entropy(logits, targets)           mean over the N rows of logsumexp - logit[target]
Backward: dlogits = llm_cross_entropy_backward(logits, targets, p_scale => s)   (softmax - onehot) / N * s
          (s = 1 for d(mean loss); e.g. 1 / micro-batches when accumulating gradients over micro-batches)

targets is an int[] of N ids (one per row), each 0 <= id < V. V need not be a multiple of the tile (GPT-2:
50257). Tiling: one microkernel call per tile-row block of logits (array_agg(data ORDER BY tc) GROUP BY tr)
gets that block's slice of targets; it computes in float64, a chunk of rows at a time to bound memory. The
forward sums per-block NLL sums; the backward returns the block's dlogits tiles as bytea[], unnested WITH
ORDINALITY into (tr, tc). The numpy microkernels: py/kernels/cross_entropy.py.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.cross_entropy import cross_entropy_backward_block, cross_entropy_block
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT

SQL_FILE = "kernels/cross_entropy.sql"
ORDER = 22


# Targets checked before anything is written; v_t is the array re-based to subscript 1.
CHECK_TARGETS = """
        IF p_targets IS NULL OR array_ndims(p_targets) IS DISTINCT FROM 1 OR cardinality(p_targets) <> v_n THEN
          RAISE EXCEPTION 'pg_llm: %: targets must be an int[] of % ids (one per row of logits "%" %), got % ids',
            v_op, v_n, rl.name, llm_shape_text(rl.shape), coalesce(cardinality(p_targets), 0);
        END IF;
        v_t := p_targets[:];
        v_bad := (
          @bad
        );
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: %: target % of row % is out of range [0, %) for logits "%" %',
            v_op, coalesce(v_t[v_bad]::TEXT, 'NULL'), v_bad - 1, v_v, rl.name, llm_shape_text(rl.shape)
            USING HINT = 'Targets are token ids: 0 <= id < vocabulary size (columns of logits).';
        END IF;"""
BAD = ("SELECT s.n FROM unnest(v_t) WITH ORDINALITY AS s(id, n) WHERE s.id IS NULL OR s.id < 0 OR s.id >= v_v "
       "ORDER BY s.n LIMIT 1")
DECLARE = "rl llm_tensor; v_n INT; v_v INT; v_th INT; v_t INT[]; v_bad BIGINT;"
INPUTS = """
        rl := llm_input(p_logits, v_op, 'logits');
        v_n := llm_rows(rl.shape); v_v := llm_cols(rl.shape); v_th := rl.tile[1];"""

FORWARD = """
    SELECT ARRAY[sum(llm_mk_cross_entropy(b.tiles, v_t[b.tr * v_th + 1:b.tr * v_th + llm_tile_dim(v_n, v_th, b.tr)],
                                          llm_tile_dim(v_n, v_th, b.tr), v_v)), count(*)::FLOAT8]
    FROM (
      SELECT t.tr, array_agg(t.data ORDER BY t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_logits GROUP BY t.tr
    ) AS b
    """


def _forward() -> str:
    body = plpgsql(f"v_op TEXT := 'cross_entropy';\n{DECLARE}\nv_res FLOAT8[];", INPUTS + CHECK_TARGETS + """
        v_res := (
          @forward
        );  -- [sum of the blocks' NLL sums, number of tile-row blocks]
        IF v_res[2] <> (v_n + v_th - 1) / v_th THEN
          RAISE EXCEPTION 'pg_llm: %: logits "%" % has % of % tile rows', v_op, rl.name, llm_shape_text(rl.shape),
            v_res[2], (v_n + v_th - 1) / v_th;
        END IF;
        RETURN v_res[1] / v_n;
    """, bad=BAD, forward=FORWARD)
    return function(
        "llm_cross_entropy", "p_logits BIGINT, p_targets INT[]", "FLOAT8", body, volatility="STABLE",
        settings=KERNEL_SETTINGS,
        note="""
        op: cross_entropy forward. logits (N, V), targets int[N] (0 <= id < V) -> mean over rows of
        logsumexp(row) - row[target] (torch.nn.functional.cross_entropy), computed in float64. tiling: one
        llm_mk_cross_entropy call per tile-row block of logits (any tile, V ragged); nothing is written.""")


BACKWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, b.tr, o.k - 1, o.data
    FROM (
      SELECT t.tr, array_agg(t.data ORDER BY t.tc) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_logits GROUP BY t.tr
    ) AS b
    CROSS JOIN LATERAL unnest(llm_mk_cross_entropy_backward(b.tiles,
        v_t[b.tr * v_th + 1:b.tr * v_th + llm_tile_dim(v_n, v_th, b.tr)], llm_tile_dim(v_n, v_th, b.tr), v_v,
        p_scale / v_n)) WITH ORDINALITY AS o(data, k)
    WHERE TRUE
    """ + UPSERT


def _backward() -> str:
    body = plpgsql(f"v_op TEXT := 'cross_entropy_backward';\n{DECLARE}\nv_out BIGINT;", INPUTS + CHECK_TARGETS + """
        IF p_scale IS NULL THEN
          RAISE EXCEPTION 'pg_llm: %: p_scale must not be NULL', v_op;
        END IF;
        v_out := llm_output(p_out, v_op, rl.shape, rl.tile, p_accumulate);
        @backward;
        RETURN v_out;
    """, bad=BAD, backward=BACKWARD)
    return function(
        "llm_cross_entropy_backward",
        "p_logits BIGINT, p_targets INT[], p_out BIGINT DEFAULT NULL, p_scale FLOAT8 DEFAULT 1.0, "
        "p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""
        op: cross_entropy backward. logits (N, V), targets int[N] -> dlogits (N, V) = (softmax(logits) -
        onehot(targets)) / N * scale: the gradient of scale * llm_cross_entropy. tiling: dlogits has the logits'
        tile; one llm_mk_cross_entropy_backward call per tile-row block. p_out NULL allocates a scratch tensor.""")


def emit() -> str:
    mk = microkernel(
        "llm_mk_cross_entropy", "tiles BYTEA[], targets INT[], rows INT, cols INT", "FLOAT8",
        cross_entropy_block, note="""
        cross_entropy microkernel: one tile-row block of logits (rows x cols, tiles ordered by column) and its
        rows' targets -> sum over the rows of logsumexp - logit[target] (float64).""")
    mkb = microkernel(
        "llm_mk_cross_entropy_backward", "tiles BYTEA[], targets INT[], rows INT, cols INT, scale FLOAT8",
        "BYTEA[]", cross_entropy_backward_block, note="""
        cross_entropy backward microkernel: one tile-row block of logits and its rows' targets -> the block's
        tiles of (softmax - onehot) * scale, in column order.""")
    return "\n".join([comment(__doc__ or ""), mk, mkb, _forward(), _backward()])
