"""elementwise: add, mul, scale and broadcast bias add, tile by tile.

Forward:  y = a + b                llm_add(a, b)
          y = a * b                llm_mul(a, b)
          y = alpha * x            llm_scale(x, alpha)
          y = x + bias             llm_add_bias(x, bias): x (R, C), bias (C,) stored as one row of tiles (1, tw)
Backward: llm_add_backward(dy, da, db)            da = dy, db = dy
          llm_mul_backward(a, b, dy, da, db)      da = dy * b, db = dy * a
          llm_scale_backward(dy, alpha, dx)       dx = alpha * dy
          llm_add_bias_backward(dy, dx, dbias)    dx = dy, dbias = column sums of dy (llm_sum_rows, reduce.py)

Conventions (matmul's): forward ops take p_out DEFAULT NULL (allocates a scratch tensor) and p_accumulate
DEFAULT FALSE and return the output id. Backward ops write into the given gradient tensors (NULL skips one) and
accumulate by default (p_accumulate DEFAULT TRUE); a backward with a single gradient (scale) allocates it when
p_dx is NULL and returns its id. When both gradients are the same tensor (a + a, a * a) they add up.

Tiling: a and b of add/mul must have the same shape and be cut in the same tiles (tile sizes capped by the shape);
output tile (tr, tc) = one microkernel call on the (tr, tc) tiles of both. The bias is joined on tc only and must
cut its C columns like x. The output is tiled like the (first) input. Shape and tiling errors are raised before
anything is written; an input with missing tiles makes the op fail instead of writing a partial output.
The numpy microkernels: py/kernels/elementwise.py (llm_mk_add: py/kernels/common.py).
"""
from __future__ import annotations

import textwrap

from pg_llm.autograd.registry import Op
from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.elementwise import ew_tile, scale_tile
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT

SQL_FILE = "kernels/elementwise.sql"
ORDER = 12

OP = (Op("add", ("a", "b"), wrapper="p_a BIGINT, p_b BIGINT", kernel="llm_add(p_a, p_b)",
         note="out = a + b; da += g, db += g (g shared, copied on write)", backward="""
         acc({a}, {g}, FALSE);
         acc({b}, {g}, FALSE);"""),
      Op("add_bias", ("x", "b"), wrapper="p_x BIGINT, p_b BIGINT", kernel="llm_add_bias(p_x, p_b)",
         note="out = x + b; dx += g, db += sum_rows(g)", backward="""
         acc({x}, {g}, FALSE);
         acc({b}, llm_sum_rows({g}));"""))


# ---- PL/pgSQL building blocks (also used by reduce.py and gelu.py) -------------------------------------------

def lines(*chunks: str | tuple[int, str]) -> str:
    """Join PL/pgSQL chunks into one block body (for plpgsql()): each chunk is dedented, then indented by
    `level` steps when given as (level, chunk)."""
    out = []
    for c in chunks:
        level, text = c if isinstance(c, tuple) else (0, c)
        out.append(textwrap.indent(textwrap.dedent(text).strip("\n"), "  " * level))
    return "\n".join(out)


def eff_tile(r: str) -> str:
    """SQL: the tile of catalog row `r` capped by its shape, i.e. the tiling that actually cuts it."""
    return f"ARRAY[least({r}.tile[1], llm_rows({r}.shape)), least({r}.tile[2], llm_cols({r}.shape))]"


def n_tiles(rows: str, cols: str, tile: str) -> str:
    """SQL: how many tiles a (rows, cols) tensor cut in `tile` has."""
    return f"(({rows} + {tile}[1] - 1) / {tile}[1]) * (({cols} + {tile}[2] - 1) / {tile}[2])"


def check_written(op: str) -> str:
    """PL/pgSQL right after the INSERT: fail (rolling the write back) unless it wrote all v_want output tiles."""
    return f"""
        GET DIAGNOSTICS v_written = ROW_COUNT;
        IF v_written <> v_want THEN
          RAISE EXCEPTION 'pg_llm: {op}: wrote % of the % output tiles: an input is missing tiles', v_written, v_want
            USING HINT = 'Check the inputs with llm_tensor_validate(id).';
        END IF;"""


def not_in_place(op: str, out: str, inputs: str, acc: str = "p_accumulate") -> str:
    """PL/pgSQL: refuse an output that is also an input unless accumulating (it would be cleared first)."""
    return f"""
        IF NOT {acc} AND {out} IN ({inputs}) THEN
          RAISE EXCEPTION 'pg_llm: {op}: output tensor id % is also an input: it would be cleared before it is read',
            {out} USING HINT = 'Write into another tensor.';
        END IF;"""


def same_layout(op: str, ra: str, a: str, rb: str, b: str) -> str:
    """PL/pgSQL: set v_tile (ra's tiling) and error unless catalog rows ra (argument a) and rb (argument b) have
    the same shape and tiling."""
    return f"""
        v_tile := {eff_tile(ra)};
        IF llm_rows({rb}.shape) <> llm_rows({ra}.shape) OR llm_cols({rb}.shape) <> llm_cols({ra}.shape) THEN
          RAISE EXCEPTION 'pg_llm: {op}: {b} "%" has shape %, expected % (the shape of {a} "%")',
            {rb}.name, llm_shape_text({rb}.shape), llm_shape_text({ra}.shape), {ra}.name;
        END IF;
        IF {eff_tile(rb)} <> v_tile THEN
          RAISE EXCEPTION 'pg_llm: {op}: {a} "%" and {b} "%" (shape %) are cut in tiles of % and %',
            {ra}.name, {rb}.name, llm_shape_text({ra}.shape), v_tile, {eff_tile(rb)}
            USING HINT = 'Store both with the same tile.';
        END IF;"""


FORWARD_ARGS = "p_out BIGINT DEFAULT NULL, p_accumulate BOOLEAN DEFAULT FALSE"
DECLARE = "ra llm_tensor; rb llm_tensor; v_tile INT[]; v_want BIGINT; v_out BIGINT; v_written BIGINT;"

BINARY = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, a.tr, a.tc, {mk}(a.data, b.data)
    FROM llm_tile AS a
    JOIN llm_tile AS b ON b.tensor_id = p_b AND b.tr = a.tr AND b.tc = a.tc
    WHERE a.tensor_id = p_a
    """ + UPSERT

SCALE = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, t.tr, t.tc, llm_mk_scale(t.data, p_alpha)
    FROM llm_tile AS t
    WHERE t.tensor_id = p_x
    """ + UPSERT

BIAS = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, x.tr, x.tc, llm_mk_add_bias(x.data, b.data)
    FROM llm_tile AS x
    JOIN llm_tile AS b ON b.tensor_id = p_b AND b.tr = 0 AND b.tc = x.tc
    WHERE x.tensor_id = p_x
    """ + UPSERT

COPY = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, t.tr, t.tc, t.data
    FROM llm_tile AS t
    WHERE t.tensor_id = p_dy
    """ + UPSERT

def write_out(op: str, out: str = "p_out", acc: str = "p_accumulate", query: str = "forward") -> str:
    """PL/pgSQL: allocate/check the output (ra's shape, tiles v_tile), run the INSERT `@query`, check the count."""
    return f"""
        v_want := {n_tiles("llm_rows(ra.shape)", "llm_cols(ra.shape)", "v_tile")};
        v_out := llm_output({out}, '{op}', ra.shape, v_tile, {acc});
        @{query};""" + check_written(op)


def _binary(op: str, mk: str, formula: str) -> str:
    body = plpgsql(DECLARE, lines(
        f"""
        ra := llm_input(p_a, '{op}', 'a');
        rb := llm_input(p_b, '{op}', 'b');""",
        same_layout(op, "ra", "a", "rb", "b"),
        not_in_place(op, "p_out", "p_a, p_b"),
        write_out(op),
        "RETURN v_out;"), forward=BINARY.format(mk=mk))
    return function(f"llm_{op}", f"p_a BIGINT, p_b BIGINT, {FORWARD_ARGS}", "BIGINT", body,
                    settings=KERNEL_SETTINGS, note=f"""
        op: {op} forward. out = {formula}: a, b, out of one shape (R, C) or (n,).
        tiling: a and b cut in the same tiles; out tile (tr, tc) = {mk}(a tile (tr, tc), b tile (tr, tc)),
        out tiled like a. p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def _scale() -> str:
    body = plpgsql(DECLARE, lines(
        f"""
        ra := llm_input(p_x, 'scale', 'x');
        v_tile := {eff_tile("ra")};
        IF p_alpha IS NULL THEN
          RAISE EXCEPTION 'pg_llm: scale: alpha is NULL (scaling "%")', ra.name;
        END IF;""",
        not_in_place("scale", "p_out", "p_x"),
        write_out("scale"),
        "RETURN v_out;"), forward=SCALE)
    return function("llm_scale", f"p_x BIGINT, p_alpha FLOAT8, {FORWARD_ARGS}", "BIGINT", body,
                    settings=KERNEL_SETTINGS, note="""
        op: scale forward. out = alpha * x (float32), x and out (R, C) or (n,).
        tiling: out tile (tr, tc) = llm_mk_scale(x tile (tr, tc), alpha), out tiled like x.
        p_out NULL allocates a scratch tensor; p_accumulate adds into p_out (out += alpha * x, an axpy).""")


def _add_bias() -> str:
    body = plpgsql(DECLARE, lines(
        f"""
        ra := llm_input(p_x, 'add_bias', 'x');
        rb := llm_input(p_b, 'add_bias', 'b');
        v_tile := {eff_tile("ra")};
        IF llm_rows(rb.shape) <> 1 OR llm_cols(rb.shape) <> llm_cols(ra.shape) THEN
          RAISE EXCEPTION 'pg_llm: add_bias: bias "%" has shape %, expected % (one value per column of x "%" %)',
            rb.name, llm_shape_text(rb.shape), llm_shape_text(ARRAY[llm_cols(ra.shape)]), ra.name,
            llm_shape_text(ra.shape);
        END IF;
        IF least(rb.tile[2], llm_cols(rb.shape)) <> v_tile[2] THEN
          RAISE EXCEPTION 'pg_llm: add_bias: bias "%" cuts its % columns in tiles of %, x "%" in tiles of %',
            rb.name, llm_cols(rb.shape), least(rb.tile[2], llm_cols(rb.shape)), ra.name, v_tile[2]
            USING HINT = format('Store the bias with tile ARRAY[1, %s].', v_tile[2]);
        END IF;""",
        not_in_place("add_bias", "p_out", "p_x, p_b"),
        write_out("add_bias"),
        "RETURN v_out;"), forward=BIAS)
    return function("llm_add_bias", f"p_x BIGINT, p_b BIGINT, {FORWARD_ARGS}", "BIGINT", body,
                    settings=KERNEL_SETTINGS, note="""
        op: add_bias forward. out (R, C) = x (R, C) + b (C,) broadcast over rows (b stored as one row, tiles (1, tw)).
        tiling: out tile (tr, tc) = llm_mk_add_bias(x tile (tr, tc), b tile (0, tc)); b must cut its columns like x.
        p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def _add_backward() -> str:
    body = plpgsql(DECLARE + " v_grad BIGINT; v_done BIGINT; v_acc BOOLEAN;", lines(
        f"""
        ra := llm_input(p_dy, 'add_backward', 'dy');
        v_tile := {eff_tile("ra")};
        FOREACH v_grad IN ARRAY ARRAY[p_da, p_db] LOOP
          CONTINUE WHEN v_grad IS NULL;
          v_acc := p_accumulate OR coalesce(v_grad = v_done, FALSE);  -- a + a: the second gradient adds up""",
        (1, not_in_place("add_backward", "v_grad", "p_dy", "v_acc")),
        (1, write_out("add_backward", "v_grad", "v_acc", "copy")),
        (1, "v_done := v_grad;"),
        "END LOOP;"), copy=COPY)
    return function("llm_add_backward", "p_dy BIGINT, p_da BIGINT, p_db BIGINT, p_accumulate BOOLEAN DEFAULT TRUE",
                    "VOID", body, settings=KERNEL_SETTINGS, note="""
        op: add backward for y = a + b. da = dy, db = dy (all of dy's shape and tiling), each copied (or added,
        p_accumulate) into an existing gradient tensor tile by tile; pass NULL to skip one.""")


def _mul_backward() -> str:
    body = plpgsql("", """
        PERFORM llm_mul(p_dy, p_b, p_da, p_accumulate) WHERE p_da IS NOT NULL;
        PERFORM llm_mul(p_dy, p_a, p_db, p_accumulate OR coalesce(p_db = p_da, FALSE)) WHERE p_db IS NOT NULL;
    """)
    return function("llm_mul_backward",
                    "p_a BIGINT, p_b BIGINT, p_dy BIGINT, p_da BIGINT, p_db BIGINT, p_accumulate BOOLEAN DEFAULT TRUE",
                    "VOID", body, settings=KERNEL_SETTINGS, note="""
        op: mul backward for y = a * b. da = dy * b, db = dy * a (llm_mul, same shape and tiling), written (or
        accumulated) into existing gradient tensors; pass NULL to skip one. da = db (y = a * a) adds both.""")


def _scale_backward() -> str:
    body = plpgsql("", """
        RETURN llm_scale(p_dy, p_alpha, p_dx, p_accumulate);
    """)
    return function("llm_scale_backward",
                    "p_dy BIGINT, p_alpha FLOAT8, p_dx BIGINT DEFAULT NULL, p_accumulate BOOLEAN DEFAULT TRUE",
                    "BIGINT", body, settings=KERNEL_SETTINGS, note="""
        op: scale backward for y = alpha * x. dx = alpha * dy (dy's shape and tiling), added into p_dx
        (p_accumulate) or written; p_dx NULL allocates it. Returns dx.""")


def _add_bias_backward() -> str:
    body = plpgsql("", """
        PERFORM llm_input(p_dy, 'add_bias_backward', 'dy');
        PERFORM llm_add_backward(p_dy, p_dx, NULL, p_accumulate) WHERE p_dx IS NOT NULL;
        PERFORM llm_sum_rows(p_dy, p_db, p_accumulate) WHERE p_db IS NOT NULL;
    """)
    return function("llm_add_bias_backward", "p_dy BIGINT, p_dx BIGINT, p_db BIGINT, "
                    "p_accumulate BOOLEAN DEFAULT TRUE", "VOID", body, settings=KERNEL_SETTINGS, note="""
        op: add_bias backward for y = x + b, dy (R, C). dx = dy (R, C), same tiling; db = column sums of dy (C,),
        tiles (1, tw) (llm_sum_rows). Written (or accumulated) into existing tensors; pass NULL to skip one.""")


def emit() -> str:
    mks = [
        microkernel("llm_mk_mul", "a BYTEA, b BYTEA", "BYTEA", ew_tile, "ew_tile('mul', a, b)",
                    note="mul microkernel: a * b for two tiles of one shape (h, w) -> (h, w), float32."),
        microkernel("llm_mk_add_bias", "x BYTEA, b BYTEA", "BYTEA", ew_tile, "ew_tile('add_bias', x, b)",
                    note="add_bias microkernel: x tile (h, w) + bias tile (1, w) broadcast over rows -> (h, w)."),
        microkernel("llm_mk_scale", "x BYTEA, alpha FLOAT8", "BYTEA", scale_tile,
                    note="scale microkernel: alpha * x for one tile (h, w) -> (h, w), float32."),
    ]
    return "\n".join([comment(__doc__ or ""), *mks,
                      comment("llm_add uses llm_mk_add (common.py), the tile sum that accumulation also uses.") + "\n",
                      _binary("add", "llm_mk_add", "a + b"), _binary("mul", "llm_mk_mul", "a * b"), _scale(),
                      _add_bias(), _add_backward(), _mul_backward(), _scale_backward(), _add_bias_backward()])
