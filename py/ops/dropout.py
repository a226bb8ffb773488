"""dropout: inverted dropout with a seeded mask that is regenerated, never stored.

Forward:  y = x * mask / (1 - rate)          llm_dropout(x, rate, seed)
Backward: dx = dy * mask / (1 - rate)        llm_dropout_backward(dy, rate, seed, dx)   (the same mask)

The mask of tile (tr, tc) is drawn from numpy's PCG64 seeded with SeedSequence([seed mod 2^64, tr, tc]): element
i of the tile (row-major) is kept when u_i >= rate, u_i = (raw_i >> 11) * 2^-53 from the generator's raw 64-bit
stream (the stream numpy guarantees across versions; Generator.random() computes the same u). The mask therefore
depends only on (seed, tr, tc, tile shape): the same seed gives the same mask in any session, the backward
regenerates the forward's mask from the same seed, and two dropout sites need different seeds (e.g. derived from
the optimizer step, the layer and the site). rate 0 is an identity copy (the seed may then be NULL); rate must be
in [0, 1).

Tiling: out tile (tr, tc) = one llm_mk_dropout call on x's tile (tr, tc); out is tiled like x. Conventions as
gelu: p_out / p_dx NULL allocates a scratch tensor; p_accumulate adds into it (forward default FALSE, backward
default TRUE). Returns the output id. The numpy microkernel: py/kernels/dropout.py.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.dropout import dropout_tile
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT
from pg_llm.ops.elementwise import eff_tile, lines, not_in_place, write_out

SQL_FILE = "kernels/dropout.sql"
ORDER = 43

OP = Op("dropout", ("x",), args=(("rate", "FLOAT8"), ("seed", "BIGINT")),
        note="out = x * mask / (1 - p); dx += g * mask / (1 - p) (mask redrawn from the seed)", backward="""
        acc({x}, llm_dropout_backward({g}, {rate}, {seed}, NULL, FALSE));""")


DECLARE = "ra llm_tensor; v_tile INT[]; v_want BIGINT; v_out BIGINT; v_written BIGINT;"

APPLY = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, t.tr, t.tc,
           CASE WHEN p_rate = 0 THEN t.data ELSE llm_mk_dropout(t.data, p_rate, p_seed, t.tr, t.tc) END
    FROM llm_tile AS t
    WHERE t.tensor_id = {x}
    """ + UPSERT


def _apply(name: str, op: str, arg: str, out: str, acc_default: str, note: str) -> str:
    """llm_dropout / llm_dropout_backward: the same masked copy of input p_<arg> into <out>."""
    x = f"p_{arg}"
    body = plpgsql(DECLARE, lines(
        f"""
        ra := llm_input({x}, '{op}', '{arg}');
        v_tile := {eff_tile("ra")};
        IF (p_rate >= 0 AND p_rate < 1) IS NOT TRUE THEN
          RAISE EXCEPTION 'pg_llm: {op}: rate must be in [0, 1), got % (dropping "%")', p_rate, ra.name;
        END IF;
        IF p_seed IS NULL AND p_rate > 0 THEN
          RAISE EXCEPTION 'pg_llm: {op}: seed is NULL (dropping "%" at rate %)', ra.name, p_rate
            USING HINT = 'The forward and the backward must pass the same seed.';
        END IF;""",
        not_in_place(op, out, x),
        write_out(op, out=out),
        "RETURN v_out;"), forward=APPLY.format(x=x))
    return function(name, f"{x} BIGINT, p_rate FLOAT8, p_seed BIGINT, {out} BIGINT DEFAULT NULL, "
                    f"p_accumulate BOOLEAN DEFAULT {acc_default}", "BIGINT", body, settings=KERNEL_SETTINGS, note=note)


def _wrapper() -> str:
    body = plpgsql("", f"""
        IF p_rate = 0 THEN
          RETURN p_x;  -- identity: nothing to record
        END IF;
        RETURN {OP.record("llm_dropout(p_x, p_rate, p_seed)")};
    """)
    return function("llm_t_dropout", "p_tape BIGINT, p_x BIGINT, p_rate FLOAT8, p_seed BIGINT", "BIGINT", body,
                    settings=("extra_float_digits = 1",),
                    note="Recording wrapper: inverted dropout (rate 0 is the identity and records nothing).")


def emit() -> str:
    mk = microkernel("llm_mk_dropout", "x BYTEA, rate FLOAT8, seed BIGINT, tr INT, tc INT", "BYTEA", dropout_tile,
                     note="""
        dropout microkernel: x * mask / (1 - rate) for tile (tr, tc) (h, w) -> (h, w), float32; the mask is drawn
        from PCG64(SeedSequence([seed mod 2^64, tr, tc])), so it depends only on the seed, the tile coordinates and
        the tile shape.""")
    fwd = _apply("llm_dropout", "dropout", "x", "p_out", "FALSE", """
        op: dropout forward (inverted). out = x * mask / (1 - rate), x and out of one shape (R, C) or (n,); the
        mask of tile (tr, tc) is regenerated from (seed, tr, tc). rate 0 copies x. rate in [0, 1).
        tiling: out tile (tr, tc) = llm_mk_dropout(x tile (tr, tc), rate, seed, tr, tc), out tiled like x.
        p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")
    bwd = _apply("llm_dropout_backward", "dropout_backward", "dy", "p_dx", "TRUE", """
        op: dropout backward for y = dropout(x, rate, seed). dx = dy * mask / (1 - rate) with the forward's mask
        (same rate and seed, dy tiled like x). tiling: dx tile (tr, tc) = llm_mk_dropout(dy tile (tr, tc), ...).
        p_dx NULL allocates; p_accumulate (default TRUE) adds into p_dx. Returns dx.""")
    return "\n".join([comment(__doc__ or "") + "\n", mk, fwd, bwd, _wrapper()])
