"""gpt2_block: one whole GPT-2 block as ONE op of the training tape, forward and backward (the numpy side and why:
py/kernels/block_train.py).

Forward:  x (B*T, C) -> y (B*T, C) = the block (ln_1, attention, c_proj, ln_2, c_fc, gelu, c_proj, both residuals,
          dropout at GPT-2's three sites); only x is kept for the backward (the tape's input).
Backward: dy -> dx and the 12 parameter gradients, the block's intermediates recomputed from x; a run of
          consecutive blocks (each one's output only the next one's input) is one backward call, which passes
          the gradient between blocks in memory instead of writing it.

Tiling: the forward's microkernel call receives every tile of x, in (tr, tc) order, the backward's every tile of
dy and reads each block's input itself; y and dx have x's tiling, each gradient its parameter's. The parameters
come from the backend's weight cache. The training forward (llm_gpt2_forward with a tape) records its blocks as
this op unless pg_llm.fused_train = off (the chain of per-op kernels, the reference).
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.block_train import backward_kernel, forward_kernel
from pg_llm.ops.common import KERNEL_SETTINGS, insert_rows

SQL_FILE = "kernels/gpt2_block.sql"
ORDER = 35

# the SQL condition of the fused training block (a setting, so that the per-op chain stays reachable)
FUSED_TRAIN = "coalesce(current_setting('pg_llm.fused_train', TRUE), '') <> 'off'"

ARGS = ("p_params BIGINT[], p_n_head INT, p_seq_len INT, p_eps FLOAT8, p_dropout FLOAT8, p_seeds BIGINT[], "
        "p_drop_tile INT[]")
CALL = "p_params, p_n_head, p_seq_len, p_eps, p_dropout, p_seeds, p_drop_tile"

OP = Op("gpt2_block", ("x",),
        args=(("params", "BIGINT[]"), ("n_head", "INT"), ("seq_len", "INT"), ("eps", "FLOAT8"), ("dropout", "FLOAT8"),
              ("seeds", "BIGINT[]"), ("drop_tile", "INT[]")),
        wrapper="p_x BIGINT, " + ARGS, kernel=f"llm_gpt2_block(p_x, {CALL})",
        note="y = block(x); with the run of blocks before it: dx and every parameter gradient", backward="""
        PERFORM llm_grad_acc(p_tape, u.t, u.g)
        FROM llm_gpt2_block_run(p_tape, r.seq, p_after) AS k
        CROSS JOIN LATERAL unnest(k.xs[1:1] || k.params,
                                  llm_gpt2_block_backward(k.xs, {g}, k.params, {n_head}, {seq_len}, {eps}, {dropout},
                                                          k.seeds, {drop_tile}, p_tape)) AS u(t, g);""")

# The run of gpt2_block rows of a tape ending at row p_seq: each earlier block whose output is the next one's input,
# with the same arguments, while that output has no gradient of its own yet (no other consumer contributed): their
# backward is one call, which never writes the blocks' intermediate input gradients (the skipped rows' outputs get
# none, so the walk passes them by).
RUN = """
    WITH RECURSIVE run AS (
      SELECT t.seq, t.a, t.args, 1 AS n FROM llm_tape AS t WHERE t.tape = p_tape AND t.seq = p_seq
      UNION ALL
      SELECT t.seq, t.a, t.args, run.n + 1
      FROM run
      JOIN llm_tape AS t ON t.tape = p_tape AND t.out = run.a AND t.op = 'gpt2_block' AND t.seq > p_after
        AND (t.args - 'params' - 'seeds') = (run.args - 'params' - 'seeds')
      WHERE NOT EXISTS (SELECT 1 FROM llm_tape_grad AS g WHERE g.tape = p_tape AND g.tensor = run.a)
    )
    SELECT ARRAY(SELECT run.a FROM run ORDER BY run.n DESC),
           ARRAY(SELECT e.v::BIGINT FROM run CROSS JOIN LATERAL jsonb_array_elements_text(run.args -> 'params')
                   WITH ORDINALITY AS e(v, k) ORDER BY run.n DESC, e.k),
           ARRAY(SELECT e.v::BIGINT FROM run CROSS JOIN LATERAL jsonb_array_elements_text(run.args -> 'seeds')
                   WITH ORDINALITY AS e(v, k) ORDER BY run.n DESC, e.k)"""

CHECKS = """
    r := llm_input(p_x, 'gpt2_block', 'x');
    v_geom := ARRAY[llm_rows(r.shape), llm_cols(r.shape), least(r.tile[1], llm_rows(r.shape)),
                    least(r.tile[2], llm_cols(r.shape))];
    IF cardinality(p_params) IS DISTINCT FROM 12 * p_blocks OR array_position(p_params, NULL) IS NOT NULL THEN
      RAISE EXCEPTION 'pg_llm: gpt2_block: need the 12 parameter ids of each of % block(s), got %', p_blocks,
        p_params USING HINT = 'llm_gpt2_block_params(model, n_layer) lists them, 12 per layer.';
    END IF;
    IF p_n_head < 1 OR v_geom[2] % p_n_head <> 0 OR p_seq_len < 1 OR v_geom[1] % p_seq_len <> 0 THEN
      RAISE EXCEPTION 'pg_llm: gpt2_block: x "%" of shape % does not fit n_head % and seq_len %', r.name,
        llm_shape_text(r.shape), p_n_head, p_seq_len USING HINT = 'Rows are B sequences of seq_len tokens.';
    END IF;
    IF p_dropout IS NULL OR p_dropout < 0 OR p_dropout >= 1 OR cardinality(p_seeds) IS DISTINCT FROM 3 * p_blocks
       OR coalesce(cardinality(p_drop_tile), 0) NOT IN (2, 3) OR p_drop_tile[3] < 0
       OR p_drop_tile[3] % p_seq_len <> 0 THEN
      RAISE EXCEPTION 'pg_llm: gpt2_block: dropout must be in [0, 1) with 3 seeds a block and a tile (and a first row '
        'of whole sequences), got %, %, %', p_dropout, p_seeds, p_drop_tile;
    END IF;
    RETURN v_geom;
"""

FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, (o.n - 1) / v_ntc, (o.n - 1) % v_ntc, o.data
    FROM (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles FROM llm_tile AS t WHERE t.tensor_id = p_x
    ) AS g
    CROSS JOIN LATERAL unnest(llm_mk_gpt2_block(g.tiles, v_geom, p_params, p_n_head, p_seq_len, p_eps, p_dropout,
                                                p_seeds, p_drop_tile, p_x)) WITH ORDINALITY AS o(data, n)"""

BACKWARD = insert_rows("p_dy", """llm_mk_gpt2_block_backward(p_xs, d.tiles, v_geom, p_params, p_n_head, p_seq_len,
                                                         p_eps, p_dropout, p_seeds, p_drop_tile, v_tiles,
                                                         coalesce(p_tape, 0), v_ids[2:])""")

# each parameter's tiling (capped by its shape), 2 values per parameter in p_params order
GRAD_TILES = """
    SELECT e.v
    FROM unnest(p_params) WITH ORDINALITY AS p(id, k)
    JOIN llm_tensor AS v ON v.id = p.id
    CROSS JOIN LATERAL unnest(ARRAY[least(v.tile[1], llm_rows(v.shape)), least(v.tile[2], llm_cols(v.shape))])
      WITH ORDINALITY AS e(v, j)
    ORDER BY p.k, e.j"""


def _geom() -> str:
    # PL/pgSQL, not SQL: the tape's tables come later in the install script (autograd/tape.sql)
    run = function("llm_gpt2_block_run", "p_tape BIGINT, p_seq BIGINT, p_after BIGINT",
                   "TABLE(xs BIGINT[], params BIGINT[], seeds BIGINT[])",
                   plpgsql("", "RETURN QUERY\n  @run;", run=RUN), volatility="STABLE",
                   note="""The run of gpt2_block rows of a tape that ends at row p_seq (recorded after p_after): their
                   inputs (first block first), parameter ids and seeds, for one backward call.""")
    return run + "\n" + function("llm_gpt2_block_geom", "p_x BIGINT, " + ARGS + ", p_blocks INT", "INT[]",
                    plpgsql("r llm_tensor; v_geom INT[];", CHECKS), volatility="STABLE", note="""
        The checks of a gpt2_block call over p_blocks blocks (forward: 1) before anything is written; returns x's
        geometry [rows, cols, tile rows, tile cols] (the tiling capped by the shape).""")


GEOM = f"""
    r := llm_input(p_x, 'gpt2_block', 'x');
    v_geom := llm_gpt2_block_geom(p_x, {CALL}, 1);
"""


def _forward() -> str:
    body = plpgsql("r llm_tensor; v_geom INT[]; v_ntc INT; v_out BIGINT;", GEOM + """
        v_ntc := (v_geom[2] + v_geom[4] - 1) / v_geom[4];
        v_out := llm_output(NULL, 'gpt2_block', r.shape, r.tile, FALSE);
        @forward;
        RETURN v_out;
    """, forward=FORWARD)
    return function("llm_gpt2_block", "p_x BIGINT, " + ARGS, "BIGINT", body, settings=KERNEL_SETTINGS, note="""
        op: one GPT-2 block forward. x (B*T, C) -> y (B*T, C), x's tiling. p_params: the block's 12 ids
        (llm_gpt2_block_params order); p_seeds: the dropout seeds of the sites attn, attn.resid, mlp.resid;
        p_drop_tile: the tiling of the residual dropout masks, and optionally x's first row in the whole batch
        (a data-parallel rank's rows: the masks are the whole batch's). tiling: one llm_mk_gpt2_block call.""")


def _backward() -> str:
    body = plpgsql("r llm_tensor; rd llm_tensor; v_geom INT[]; v_ids BIGINT[]; v_tiles INT[]; v_bad BIGINT;", f"""
        IF coalesce(cardinality(p_xs), 0) = 0 THEN
          RAISE EXCEPTION 'pg_llm: gpt2_block_backward: no block inputs';
        END IF;
        r := llm_input(p_xs[1], 'gpt2_block_backward', 'x');
        v_geom := llm_gpt2_block_geom(p_xs[1], {CALL}, cardinality(p_xs));
        v_bad := (SELECT x.id FROM unnest(p_xs) AS x(id) LEFT JOIN llm_tensor AS v ON v.id = x.id
                  WHERE v.shape IS DISTINCT FROM r.shape OR v.tile IS DISTINCT FROM r.tile LIMIT 1);
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: gpt2_block_backward: block input % is not shaped and tiled like %', v_bad, p_xs[1];
        END IF;
        rd := llm_input(p_dy, 'gpt2_block_backward', 'dy');
        IF rd.shape <> r.shape OR rd.tile <> r.tile THEN
          RAISE EXCEPTION 'pg_llm: gpt2_block_backward: dy "%" has shape % tile %, expected those of x: % tile %',
            rd.name, llm_shape_text(rd.shape), rd.tile, llm_shape_text(r.shape), r.tile;
        END IF;
        v_tiles := ARRAY(
          @tiles
        );
        v_ids := ARRAY[llm_tensor_like(p_xs[1], 'gpt2_block.dx')]
          || ARRAY(SELECT llm_tensor_like(p.id, 'grad') FROM unnest(p_params) WITH ORDINALITY AS p(id, k)
                   ORDER BY p.k);
        @backward;
        RETURN v_ids;
    """, tiles=GRAD_TILES, backward=BACKWARD)
    return function("llm_gpt2_block_backward", "p_xs BIGINT[], p_dy BIGINT, " + ARGS + ", p_tape BIGINT DEFAULT NULL",
                    "BIGINT[]", body,
                    settings=KERNEL_SETTINGS, note="""
        op: backward of a run of n GPT-2 blocks (n >= 1). xs: the blocks' inputs (B*T, C), first block first; dy:
        the last block's output gradient -> ARRAY[dx of the first block, the 12 n parameter gradients] (new
        scratch tensors: dx with x's tiling, each gradient with its parameter's), each block's forward
        recomputed from its input. tiling: one llm_mk_gpt2_block_backward call, which reads the inputs' tiles
        one block at a time. When tape p_tape holds its gradients (ops/held.py), the parameter gradients are
        kept in the backend's memory, without tiles.""")


def emit() -> str:
    mk = ("geom INT[], params BIGINT[], n_head INT, seq_len INT, eps FLOAT8, rate FLOAT8, seeds BIGINT[], "
          "drop_tile INT[]")
    fwd = function("llm_mk_gpt2_block", "tiles BYTEA[], " + mk + ", x BIGINT", "BYTEA[]",
                   kernel_body(forward_kernel, "forward_kernel(plpy, GD, tiles, geom, params, n_head, seq_len, eps, "
                                               "rate, seeds, drop_tile, x)"),
                   language="plpython3u", volatility="STABLE", strict=True, settings=("jit = off",), note="""
        gpt2_block microkernel: y's tiles from x's tiles (tensor x; geom = [rows, cols, tile rows, tile cols]) and
        the block's weights from the backend's weight cache; during a training step the intermediates stay in
        memory for the backward, up to pg_llm.train_keep_mb (ops/held.py).""")
    bwd = function("llm_mk_gpt2_block_backward", "xs BIGINT[], dy_tiles BYTEA[], " + mk + ", grad_tiles INT[], "
                   "tape BIGINT, grad_ids BIGINT[]",
                   "TABLE(k INT, tr INT, tc INT, data BYTEA)",
                   kernel_body(backward_kernel, "backward_kernel(plpy, GD, xs, dy_tiles, geom, params, n_head, "
                                                "seq_len, eps, rate, seeds, drop_tile, grad_tiles, tape, "
                                                "grad_ids)"),
                   language="plpython3u", volatility="STABLE", strict=True, settings=("jit = off",), note="""
        gpt2_block backward microkernel: (k, tr, tc, data) rows, k = 0 dx's tiles, k = 1..12 the gradient tiles of
        parameter k (its tiling: grad_tiles[2k-1:2k]), or held under grad_ids when the tape holds its gradients.""")
    return "\n".join([comment(__doc__ or ""), fwd, bwd, _geom(), _forward(), _backward()])
