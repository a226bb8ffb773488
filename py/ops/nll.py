"""nll: per-row negative log-likelihood of target ids under softmax(logits) for a range of rows of logits (N, V).

Forward:  nll = llm_nll(logits, targets, p_first_row => f)    nll[i] = logsumexp(row f+i) - logits[f+i, targets[i]]
          (float8[] of len(targets), in row order; rows f .. f+len(targets)-1 of logits).

What cross_entropy (mean over every row) does not give: the per-token terms of some rows only, which is
what a sliding-window perplexity needs (only the last rows of a window are scored) and what sums exactly
(sum of float64 terms, then a division by an exact token count). No backward: this is for evaluation.

Tiling: one llm_mk_nll call per tile-row block of logits that holds scored rows (array_agg(data ORDER BY tc)
GROUP BY tr), given the local offset of the first scored row and that block's targets; float64, 32 rows at a
time to bound the temporaries. The numpy microkernel: py/kernels/nll.py.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.nll import nll_rows
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "kernels/nll.sql"
ORDER = 24


CHECKS = """
    rl := llm_input(p_logits, v_op, 'logits');
    v_n := llm_rows(rl.shape); v_v := llm_cols(rl.shape); v_th := rl.tile[1];
    v_k := coalesce(cardinality(p_targets), 0);
    IF p_targets IS NULL OR (v_k > 0 AND array_ndims(p_targets) <> 1) THEN
      RAISE EXCEPTION 'pg_llm: %: targets must be a one-dimensional int[] (one id per scored row)', v_op;
    END IF;
    IF p_first_row IS NULL OR p_first_row < 0 OR p_first_row + v_k > v_n THEN
      RAISE EXCEPTION 'pg_llm: %: rows % .. % are outside logits "%" %', v_op, p_first_row,
        p_first_row + v_k - 1, rl.name, llm_shape_text(rl.shape)
        USING HINT = 'targets[i] is scored against row p_first_row + i.';
    END IF;
    v_t := p_targets[:];
    v_bad := (
      @bad
    );
    IF v_bad IS NOT NULL THEN
      RAISE EXCEPTION 'pg_llm: %: target % (index %) is out of range [0, %) for logits "%" %', v_op,
        coalesce(v_t[v_bad]::TEXT, 'NULL'), v_bad - 1, v_v, rl.name, llm_shape_text(rl.shape)
        USING HINT = 'Targets are token ids: 0 <= id < vocabulary size (columns of logits).';
    END IF;
"""
BAD = ("SELECT s.n FROM unnest(v_t) WITH ORDINALITY AS s(id, n) WHERE s.id IS NULL OR s.id < 0 OR s.id >= v_v "
       "ORDER BY s.n LIMIT 1")

FORWARD = """
    SELECT array_agg(u.v ORDER BY b.tr, u.n)
    FROM (
      SELECT t.tr, array_agg(t.data ORDER BY t.tc) AS tiles
      FROM llm_tile AS t
      WHERE t.tensor_id = p_logits AND t.tr BETWEEN p_first_row / v_th AND (p_first_row + v_k - 1) / v_th
      GROUP BY t.tr
    ) AS b
    CROSS JOIN LATERAL unnest(llm_mk_nll(b.tiles, llm_tile_dim(v_n, v_th, b.tr), v_v,
        greatest(p_first_row, b.tr * v_th) - b.tr * v_th,
        v_t[greatest(p_first_row, b.tr * v_th) - p_first_row + 1:least(p_first_row + v_k, (b.tr + 1) * v_th)
            - p_first_row])) WITH ORDINALITY AS u(v, n)
    """


def _forward() -> str:
    body = plpgsql("""
        v_op TEXT := 'nll';
        rl llm_tensor; v_n INT; v_v INT; v_th INT; v_k INT; v_t INT[]; v_bad BIGINT; v_res FLOAT8[];
    """, CHECKS + """
        IF v_k = 0 THEN
          RETURN '{}'::FLOAT8[];
        END IF;
        v_res := (
          @forward
        );
        IF coalesce(cardinality(v_res), 0) <> v_k THEN
          RAISE EXCEPTION 'pg_llm: %: logits "%" % is missing tile rows (% of % rows scored)', v_op, rl.name,
            llm_shape_text(rl.shape), coalesce(cardinality(v_res), 0), v_k;
        END IF;
        RETURN v_res;
    """, bad=BAD, forward=FORWARD)
    return function(
        "llm_nll", "p_logits BIGINT, p_targets INT[], p_first_row INT DEFAULT 0", "FLOAT8[]", body,
        volatility="STABLE", settings=KERNEL_SETTINGS,
        note="""
        op: per-row NLL. logits (N, V), targets int[k], p_first_row f -> float8[k], element i =
        logsumexp(logits[f + i]) - logits[f + i, targets[i]] (float64). Sum it for an exact NLL total. tiling: one
        llm_mk_nll call per tile-row block holding scored rows; nothing is written.""")


def emit() -> str:
    mk = microkernel(
        "llm_mk_nll", "tiles BYTEA[], rows INT, cols INT, skip INT, targets INT[]", "FLOAT8[]", nll_rows,
        note="""
        nll microkernel: one tile-row block of logits (rows x cols, tiles ordered by column) -> NLL (float64) of its
        rows skip .. skip + len(targets) - 1 against targets.""")
    return "\n".join([comment(__doc__ or ""), mk, _forward()])
