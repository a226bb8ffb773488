"""embedding: gather rows of a weight (V, C) by id, and the scatter-add backward.

Forward:  out = llm_embedding(w, ids)              out[t] = w[ids[t]], out (len(ids), C)
          GPT-2 input, a batch of B sequences of T tokens as (B*T, C) rows: x = wte[tokens] + wpe[positions]
          is two lookups and an add, the second accumulated into the first:
            x := llm_embedding(wte, tokens);                                  -- tokens int[B*T]
            PERFORM llm_embedding(wpe, positions, x, p_accumulate => TRUE);  -- positions[i] = i % T
          (or llm_add(llm_embedding(wte, tokens), llm_embedding(wpe, positions)) with the elementwise op).
Backward: llm_embedding_backward(dy, ids, dw)     dw[ids[t]] += dy[t] (repeated ids accumulate)

Tiling: out is cut in (p_out_tile_rows, w's tile cols) tiles, p_out_tile_rows defaulting to 256 capped by
len(ids). The forward is a row gather done by PostgreSQL itself: output tile (i, j) is the ordered
concatenation (string_agg) of the id rows' slices of weight tiles (ids[t] / tile_rows, j), cut with substr,
which reads only those bytes of an out-of-line (STORAGE EXTERNAL) tile: a gather of 1024 tokens from
wte (50257, 768) reads 3 MB, not the whole table. The backward groups the dy row slices by the weight tile
they land in: one llm_mk_embedding_scatter call per touched weight tile, which scatter-adds the rows (np.add.at)
into a zero tile. Accumulating (the default) adds those tiles into an existing, complete gradient (common.UPSERT)
and touches nothing else; otherwise the untouched weight tiles are written as zeros so dw is complete.
The numpy microkernel (the scatter-add): py/kernels/embedding.py.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.gen.storage import DEFAULT_TILE
from pg_llm.kernels.embedding import embedding_scatter_tile
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT

SQL_FILE = "kernels/embedding.sql"
ORDER = 23

OP = Op("embedding", ("w",), args=(("ids", "INT[]"),), wrapper="p_w BIGINT, p_ids INT[], p_tile_rows INT",
        kernel="llm_embedding(p_w, p_ids, NULL, p_tile_rows)",
        note="out = w[ids]; dw[ids] += g (scatter-add straight into an owned gradient: the tied wte)", backward="""
        dw := llm_grad_of(p_tape, {w});
        IF dw IS NULL OR NOT (SELECT tg.owned FROM llm_tape_grad AS tg WHERE tg.tape = p_tape AND tg.tensor = {w}) THEN
          dx := like({w}, 'dw');
          PERFORM llm_embedding_backward({g}, {ids}, dx, FALSE);
          acc({w}, dx);
        ELSE
          PERFORM llm_embedding_backward({g}, {ids}, dw, TRUE);
        END IF;""")


# ids checked before anything is written; v_ids is the array re-based to subscript 1.
CHECK_IDS = """
        IF p_ids IS NULL OR array_ndims(p_ids) IS DISTINCT FROM 1 OR cardinality(p_ids) <> v_n THEN
          RAISE EXCEPTION 'pg_llm: %: ids must be %, got % ids', v_op, v_want, coalesce(cardinality(p_ids), 0);
        END IF;
        v_ids := p_ids[:];
        v_bad := (
          @bad
        );
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: %: id % at position % is out of range [0, %) for weight "%" %',
            v_op, coalesce(v_ids[v_bad]::TEXT, 'NULL'), v_bad - 1, v_v, rw.name, llm_shape_text(rw.shape)
            USING HINT = 'ids index rows of the weight: 0 <= id < rows.';
        END IF;"""
BAD = ("SELECT s.n FROM unnest(v_ids) WITH ORDINALITY AS s(id, n) WHERE s.id IS NULL OR s.id < 0 OR s.id >= v_v "
       "ORDER BY s.n LIMIT 1")

FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, (s.n - 1) / v_to, w.tc,
           string_agg(substr(w.data, (s.id % v_tv) * 4 * llm_tile_dim(v_c, v_tw, w.tc) + 1,
                             4 * llm_tile_dim(v_c, v_tw, w.tc)), ''::BYTEA ORDER BY s.n)
    FROM unnest(v_ids) WITH ORDINALITY AS s(id, n)
    JOIN llm_tile AS w ON w.tensor_id = p_weight AND w.tr = s.id / v_tv
    GROUP BY (s.n - 1) / v_to, w.tc
    """ + UPSERT


def _forward() -> str:
    body = plpgsql("""
        v_op TEXT := 'embedding';
        rw llm_tensor; v_v INT; v_c INT; v_tv INT; v_tw INT; v_n INT; v_to INT; v_ids INT[]; v_bad BIGINT;
        v_out BIGINT; v_want TEXT;
    """, """
        rw := llm_input(p_weight, v_op, 'weight');
        v_v := llm_rows(rw.shape); v_c := llm_cols(rw.shape); v_tv := rw.tile[1]; v_tw := rw.tile[2];
        v_n := greatest(cardinality(p_ids), 1);
        v_want := 'a non-empty int[] (one id per output row)';""" + CHECK_IDS + f"""
        IF p_out_tile_rows < 1 THEN
          RAISE EXCEPTION 'pg_llm: %: p_out_tile_rows must be positive, got %', v_op, p_out_tile_rows;
        END IF;
        v_to := least(coalesce(p_out_tile_rows, {DEFAULT_TILE[0]}), v_n);
        v_out := llm_output(p_out, v_op, ARRAY[v_n, v_c], ARRAY[v_to, v_tw], p_accumulate);
        @forward;
        RETURN v_out;
    """, bad=BAD, forward=FORWARD)
    return function(
        "llm_embedding",
        "p_weight BIGINT, p_ids INT[], p_out BIGINT DEFAULT NULL, p_out_tile_rows INT DEFAULT NULL, "
        "p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note=f"""
        op: embedding forward. weight (V, C), ids int[N] (0 <= id < V) -> out (N, C), out[t] = weight[ids[t]].
        tiling: out tile (least(p_out_tile_rows, N), weight's tile cols), p_out_tile_rows default
        {DEFAULT_TILE[0]}; out tile (i, j) concatenates substr slices of weight tiles (ids[t] / tile_rows, j).
        p_out NULL allocates a scratch tensor; p_accumulate adds into p_out (x = wte[tokens] + wpe[positions]).""")


ZEROS = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT p_dweight, r.r, c.c,
           llm_mk_embedding_scatter(''::BYTEA, '{}'::INT[], llm_tile_dim(v_v, v_tv, r.r), llm_tile_dim(v_c, v_tw, c.c))
    FROM generate_series(0, (v_v + v_tv - 1) / v_tv - 1) AS r(r)
    CROSS JOIN generate_series(0, (v_c + v_tw - 1) / v_tw - 1) AS c(c)
    WHERE NOT r.r IN (SELECT DISTINCT u.id / v_tv FROM unnest(v_ids) AS u(id))
    """

BACKWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT p_dweight, g.r, g.c,
           llm_mk_embedding_scatter(g.segs, g.local_rows, llm_tile_dim(v_v, v_tv, g.r), llm_tile_dim(v_c, v_tw, g.c))
    FROM (
      SELECT s.id / v_tv AS r, d.tc AS c,
             string_agg(substr(d.data, ((s.n::INT - 1) % v_td) * 4 * llm_tile_dim(v_c, v_tw, d.tc) + 1,
                               4 * llm_tile_dim(v_c, v_tw, d.tc)), ''::BYTEA ORDER BY s.n) AS segs,
             array_agg(s.id % v_tv ORDER BY s.n) AS local_rows
      FROM unnest(v_ids) WITH ORDINALITY AS s(id, n)
      JOIN llm_tile AS d ON d.tensor_id = p_dy AND d.tr = (s.n - 1) / v_td
      GROUP BY s.id / v_tv, d.tc
    ) AS g
    WHERE TRUE
    """ + UPSERT


def _backward() -> str:
    body = plpgsql("""
        v_op TEXT := 'embedding_backward';
        rw llm_tensor; rdy llm_tensor; v_v INT; v_c INT; v_tv INT; v_tw INT; v_n INT; v_td INT; v_ids INT[];
        v_bad BIGINT; v_want TEXT;
    """, """
        rdy := llm_input(p_dy, v_op, 'dy');
        rw := llm_input(p_dweight, v_op, 'dweight');
        v_v := llm_rows(rw.shape); v_c := llm_cols(rw.shape); v_tv := rw.tile[1]; v_tw := rw.tile[2];
        v_n := llm_rows(rdy.shape); v_td := rdy.tile[1];
        IF llm_cols(rdy.shape) <> v_c OR rdy.tile[2] <> v_tw THEN
          RAISE EXCEPTION 'pg_llm: %: dy "%" has shape % tile %, expected (N, %) cut like dweight "%" % (tile cols %)',
            v_op, rdy.name, llm_shape_text(rdy.shape), rdy.tile, v_c, rw.name, llm_shape_text(rw.shape), v_tw;
        END IF;
        v_want := format('an int[] of %s ids (one per row of dy "%s")', v_n, rdy.name);""" + CHECK_IDS + """
        IF p_accumulate IS NULL THEN
          RAISE EXCEPTION 'pg_llm: %: p_accumulate must not be NULL', v_op;
        END IF;
        PERFORM llm_output(p_dweight, v_op, rw.shape, rw.tile, p_accumulate);
        IF NOT p_accumulate THEN
          @zeros;
        END IF;
        @backward;
        RETURN p_dweight;
    """, bad=BAD, zeros=ZEROS, backward=BACKWARD)
    return function(
        "llm_embedding_backward",
        "p_dy BIGINT, p_ids INT[], p_dweight BIGINT, p_accumulate BOOLEAN DEFAULT TRUE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""
        op: embedding backward for out = weight[ids]. dy (N, C), ids int[N] -> dweight (V, C) += scatter of the dy
        rows (dweight[ids[t]] += dy[t]; repeated ids accumulate) into an existing tensor; returns its id.
        tiling: dy is cut in dweight's column tiles (any tile rows); one llm_mk_embedding_scatter call per weight
        tile an id lands in. p_accumulate (default) adds into the existing, complete gradient and touches only
        those tiles; FALSE rewrites dweight completely (zero tiles where no id lands).""")


def emit() -> str:
    mk = microkernel(
        "llm_mk_embedding_scatter", "segs BYTEA, local_rows INT[], rows INT, cols INT", "BYTEA",
        embedding_scatter_tile,
        note="""
        embedding backward microkernel: one (rows x cols) weight-gradient tile from the concatenated dy row slices
        (k x cols) and the local row each one lands in (scatter-add, repeated rows accumulate); empty -> zeros.""")
    return "\n".join([comment(__doc__ or ""), mk, _forward(), _backward()])
