"""gelu: GPT-2's tanh approximation, tile by tile.

Forward:  y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2 / pi)     llm_gelu(x)
          (torch.nn.functional.gelu(x, approximate='tanh'), computed in float32)
Backward: dx = dy * gelu'(x),                                                llm_gelu_backward(x, dy, dx)
          gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2), t = tanh(k (x + 0.044715 x^3))

Tiling: out tile (tr, tc) = one microkernel call on x's tile (tr, tc) (and dy's, joined on (tr, tc), for the
backward: x and dy must have the same shape and tiling). Conventions as matmul: p_out / p_dx DEFAULT NULL
allocates a scratch tensor, p_accumulate adds into it (forward default FALSE; backward default TRUE, gradients
accumulate). Returns the output id. The numpy microkernels: py/kernels/gelu.py.
"""
from __future__ import annotations

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.gelu import gelu_backward_tile, gelu_tile
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT
from pg_llm.ops.elementwise import eff_tile, lines, not_in_place, same_layout, write_out

SQL_FILE = "kernels/gelu.sql"
ORDER = 13

OP = Op("gelu", ("x",), wrapper="p_x BIGINT", kernel="llm_gelu(p_x)", note="out = gelu(x); dx += g * gelu'(x)",
        backward="acc({x}, llm_gelu_backward({x}, {g}, NULL, FALSE));")


# ---- SQL ----------------------------------------------------------------------------------------------------

DECLARE = "ra llm_tensor; rb llm_tensor; v_tile INT[]; v_want BIGINT; v_out BIGINT; v_written BIGINT;"

FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, t.tr, t.tc, llm_mk_gelu(t.data)
    FROM llm_tile AS t
    WHERE t.tensor_id = p_x
    """ + UPSERT

BACKWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, x.tr, x.tc, llm_mk_gelu_backward(x.data, dy.data)
    FROM llm_tile AS x
    JOIN llm_tile AS dy ON dy.tensor_id = p_dy AND dy.tr = x.tr AND dy.tc = x.tc
    WHERE x.tensor_id = p_x
    """ + UPSERT


def _forward() -> str:
    body = plpgsql(DECLARE, lines(
        f"""
        ra := llm_input(p_x, 'gelu', 'x');
        v_tile := {eff_tile("ra")};""",
        not_in_place("gelu", "p_out", "p_x"),
        write_out("gelu"),
        "RETURN v_out;"), forward=FORWARD)
    return function("llm_gelu", "p_x BIGINT, p_out BIGINT DEFAULT NULL, p_accumulate BOOLEAN DEFAULT FALSE",
                    "BIGINT", body, settings=KERNEL_SETTINGS, note="""
        op: gelu forward (tanh form, float32). out = gelu(x), x and out of one shape (R, C) or (n,).
        tiling: out tile (tr, tc) = llm_mk_gelu(x tile (tr, tc)), out tiled like x.
        p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def _backward() -> str:
    body = plpgsql(DECLARE, lines(
        """
        ra := llm_input(p_x, 'gelu_backward', 'x');
        rb := llm_input(p_dy, 'gelu_backward', 'dy');""",
        same_layout("gelu_backward", "ra", "x", "rb", "dy"),
        not_in_place("gelu_backward", "p_dx", "p_x, p_dy"),
        write_out("gelu_backward", out="p_dx"),
        "RETURN v_out;"), forward=BACKWARD)
    return function("llm_gelu_backward", "p_x BIGINT, p_dy BIGINT, p_dx BIGINT DEFAULT NULL, "
                    "p_accumulate BOOLEAN DEFAULT TRUE", "BIGINT", body, settings=KERNEL_SETTINGS, note="""
        op: gelu backward for y = gelu(x). dx = dy * gelu'(x): x, dy, dx of one shape (R, C) or (n,).
        tiling: x and dy cut in the same tiles; dx tile (tr, tc) = llm_mk_gelu_backward(x tile, dy tile),
        dx tiled like x. p_dx NULL allocates; p_accumulate (default TRUE) adds into p_dx. Returns dx.""")


def emit() -> str:
    mks = [
        microkernel("llm_mk_gelu", "x BYTEA", "BYTEA", gelu_tile,
                    note="gelu microkernel: tanh-form GELU of one tile (h, w) -> (h, w), float32."),
        microkernel("llm_mk_gelu_backward", "x BYTEA, dy BYTEA", "BYTEA", gelu_backward_tile,
                    note="gelu backward microkernel: dy * gelu'(x) for x and dy tiles of one shape (h, w) -> (h, w)."),
    ]
    return "\n".join([comment(__doc__ or ""), *mks, _forward(), _backward()])
