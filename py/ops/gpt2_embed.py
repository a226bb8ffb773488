"""gpt2_embed: GPT-2's input as ONE op of the training tape, forward and backward (the numpy side and why:
py/kernels/embed_train.py).

Forward:  x (B*T, C) = dropout(wte[tokens] + wpe[i % T]), the chain's embedding, embedding, add and dropout ops
          (the same float32 sum and the same masks, drawn per tile of x).
Backward: dx -> the gradients of wte (scatter-add of the undropped rows by token, plus the tape's pending gradient
          of wte: the tied LM head's, ops/head_nll.py) and of wpe (by position), each written once.

Tiling: x is cut in (p_tile_rows, wte's tile columns) tiles; one microkernel call forward (wte and wpe from the
backend's weight cache), one backward receiving every tile of dx. The training forward (llm_gpt2_forward with a
tape) records it unless pg_llm.fused_train = off.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.embed_train import backward_kernel, forward_kernel
from pg_llm.ops.common import KERNEL_SETTINGS, insert_rows

SQL_FILE = "kernels/gpt2_embed.sql"
ORDER = 35

ARGS = "p_tokens INT[], p_seq_len INT, p_dropout FLOAT8, p_seed BIGINT, p_row0 INT"
CALL = "p_tokens, p_seq_len, p_dropout, p_seed, p_row0"

OP = Op("gpt2_embed", ("wte", "wpe"),
        args=(("tokens", "INT[]"), ("seq_len", "INT"), ("dropout", "FLOAT8"), ("seed", "BIGINT"), ("row0", "INT"),
              ("tile_rows", "INT")),
        wrapper=f"p_wte BIGINT, p_wpe BIGINT, {ARGS}, p_tile_rows INT",
        kernel=f"llm_gpt2_embed(p_wte, p_wpe, {CALL}, p_tile_rows)",
        note="x = dropout(wte[tokens] + wpe[pos]); dwte (+ the head's pending part), dwpe by scatter-add", backward="""
        PERFORM llm_grad_acc(p_tape, u.t, u.g)
        FROM unnest(ARRAY[{wte}, {wpe}], llm_gpt2_embed_backward({g}, {wte}, {wpe}, {tokens}, {seq_len}, {dropout},
                                                                 {seed}, {row0}, {tile_rows}, p_tape)) AS u(t, g);""")

CHECKS = """
    re := llm_input(p_wte, 'gpt2_embed', 'wte');
    rp := llm_input(p_wpe, 'gpt2_embed', 'wpe');
    v_n := coalesce(cardinality(p_tokens), 0);
    IF array_length(re.shape, 1) <> 2 OR array_length(rp.shape, 1) <> 2 OR re.shape[2] <> rp.shape[2]
       OR least(re.tile[2], re.shape[2]) <> least(rp.tile[2], rp.shape[2]) THEN
      RAISE EXCEPTION 'pg_llm: gpt2_embed: wte "%" % tile % and wpe "%" % tile % do not fit', re.name,
        llm_shape_text(re.shape), re.tile, rp.name, llm_shape_text(rp.shape), rp.tile
        USING HINT = 'wte (vocab, C) and wpe (positions, C), with the same tile columns.';
    END IF;
    IF v_n = 0 OR p_seq_len IS NULL OR p_seq_len < 1 OR v_n % p_seq_len <> 0 OR p_seq_len > rp.shape[1] THEN
      RAISE EXCEPTION 'pg_llm: gpt2_embed: % tokens are not sequences of % positions (wpe has %)', v_n, p_seq_len,
        rp.shape[1] USING HINT = 'Pass B * T tokens with seq_len T <= the context length.';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_tokens) AS s(id) WHERE s.id IS NULL OR s.id < 0 OR s.id >= re.shape[1]) THEN
      RAISE EXCEPTION 'pg_llm: gpt2_embed: a token id is NULL or outside [0, %)', re.shape[1];
    END IF;
    IF p_dropout IS NULL OR p_dropout < 0 OR p_dropout >= 1 OR (p_dropout > 0 AND p_seed IS NULL) THEN
      RAISE EXCEPTION 'pg_llm: gpt2_embed: dropout must be in [0, 1) with a seed, got % and %', p_dropout, p_seed;
    END IF;
    IF p_row0 IS NULL OR p_row0 < 0 OR p_row0 % p_seq_len <> 0 OR p_tile_rows IS NULL OR p_tile_rows < 1 THEN
      RAISE EXCEPTION 'pg_llm: gpt2_embed: first row % and tile rows % (want a multiple of seq_len %, >= 0, and > 0)',
        p_row0, p_tile_rows, p_seq_len;
    END IF;"""

FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, (o.n - 1) / v_ntc, (o.n - 1) % v_ntc, o.data
    FROM unnest(llm_mk_gpt2_embed(p_wte, p_wpe, p_tokens, p_seq_len, p_dropout, coalesce(p_seed, 0), v_tile,
                                  ARRAY[p_tile_rows, p_row0]))
      WITH ORDINALITY AS o(data, n)"""

BACKWARD = insert_rows("p_dx", """llm_mk_gpt2_embed_backward(d.tiles, v_geom, p_wte, p_wpe, p_tokens, p_seq_len,
                                                         p_dropout, coalesce(p_seed, 0), ARRAY[p_tile_rows, p_row0],
                                                         coalesce(p_tape, 0), v_gtiles, v_ids)""")


def _forward() -> str:
    body = plpgsql("re llm_tensor; rp llm_tensor; v_n INT; v_tile INT[]; v_ntc INT; v_out BIGINT;", CHECKS + """
        v_tile := ARRAY[least(p_tile_rows, v_n), least(re.tile[2], re.shape[2])];
        v_ntc := (re.shape[2] + v_tile[2] - 1) / v_tile[2];
        v_out := llm_output(NULL, 'gpt2_embed', ARRAY[v_n, re.shape[2]], v_tile, FALSE);
        @forward;
        RETURN v_out;
    """, forward=FORWARD)
    return function("llm_gpt2_embed", f"p_wte BIGINT, p_wpe BIGINT, {ARGS}, p_tile_rows INT", "BIGINT", body,
                    settings=KERNEL_SETTINGS, note="""
        op: GPT-2's input. wte (V, C), wpe (P, C), tokens (B*T ids, sequences of p_seq_len = T) -> x (B*T, C) =
        dropout(wte[tokens] + wpe[i % T], p_dropout, p_seed). tiling: x (least(p_tile_rows, B*T), wte's tile
        columns), the dropout masks drawn per tile of (p_tile_rows, those columns) of the whole batch, whose row
        p_row0 is x's first (a data-parallel rank's share; 0: x is the batch); one llm_mk_gpt2_embed call.""")


def _backward() -> str:
    body = plpgsql("re llm_tensor; rp llm_tensor; rd llm_tensor; v_n INT; v_geom INT[]; v_gtiles INT[]; "
                   "v_ids BIGINT[];", CHECKS + """
        rd := llm_input(p_dx, 'gpt2_embed_backward', 'dx');
        IF rd.shape IS DISTINCT FROM ARRAY[v_n, re.shape[2]] THEN
          RAISE EXCEPTION 'pg_llm: gpt2_embed_backward: dx "%" has shape %, expected (%, %)', rd.name,
            llm_shape_text(rd.shape), v_n, re.shape[2];
        END IF;
        v_geom := ARRAY[v_n, re.shape[2], least(rd.tile[1], v_n), least(rd.tile[2], re.shape[2])];
        v_gtiles := ARRAY[least(re.tile[1], re.shape[1]), least(re.tile[2], re.shape[2]),
                          least(rp.tile[1], rp.shape[1]), least(rp.tile[2], rp.shape[2])];
        v_ids := ARRAY[llm_tensor_like(p_wte, 'grad'), llm_tensor_like(p_wpe, 'grad')];
        @backward;
        RETURN v_ids;
    """, backward=BACKWARD)
    return function("llm_gpt2_embed_backward",
                    f"p_dx BIGINT, p_wte BIGINT, p_wpe BIGINT, {ARGS}, p_tile_rows INT, p_tape BIGINT",
                    "BIGINT[]", body, settings=KERNEL_SETTINGS, note="""
        op: gpt2_embed backward. dx (B*T, C) -> ARRAY[dwte, dwpe] (new scratch tensors tiled like wte and wpe): the
        rows of dx through the forward's dropout, scatter-added by token and by position; dwte includes the tape
        p_tape's pending gradient of wte (the tied LM head's, llm_head_nll with a tape). tiling: one
        llm_mk_gpt2_embed_backward call over every tile of dx.""")


def emit() -> str:
    fwd = function("llm_mk_gpt2_embed", "wte BIGINT, wpe BIGINT, tokens INT[], seq_len INT, rate FLOAT8, seed BIGINT, "
                   "tile INT[], drop INT[]", "BYTEA[]",
                   kernel_body(forward_kernel, "forward_kernel(plpy, GD, wte, wpe, tokens, seq_len, rate, seed, tile, "
                                               "drop)"),
                   language="plpython3u", volatility="STABLE", strict=True, settings=("jit = off",), note="""
        gpt2_embed microkernel: x's tiles ((tr, tc) order, tiling `tile`), wte and wpe from the weight cache; drop =
        [the masks' tile rows, x's first row in the whole batch].""")
    bwd = function("llm_mk_gpt2_embed_backward", "dx_tiles BYTEA[], geom INT[], wte BIGINT, wpe BIGINT, tokens INT[], "
                   "seq_len INT, rate FLOAT8, seed BIGINT, drop INT[], tape BIGINT, grad_tiles INT[], "
                   "grad_ids BIGINT[]",
                   "TABLE(k INT, tr INT, tc INT, data BYTEA)",
                   kernel_body(backward_kernel, "backward_kernel(plpy, GD, dx_tiles, geom, wte, wpe, tokens, seq_len, "
                                                "rate, seed, drop, tape, grad_tiles, grad_ids)"),
                   language="plpython3u", volatility="VOLATILE", strict=True, settings=("jit = off",), note="""
        gpt2_embed backward microkernel: (k, tr, tc, data) rows, k = 0 wte's gradient tiles (with the tape's pending
        gradient of wte, taken out of the backend's memory), k = 1 wpe's; none when the tape holds its gradients
        (kept under grad_ids).""")
    return "\n".join([comment(__doc__ or ""), fwd, bwd, _forward(), _backward()])
