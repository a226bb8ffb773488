"""reduce: sums over the rows or the columns of a tensor, and their backward (broadcast).

Forward:  s = x.sum(axis=0)   llm_sum_rows(x): x (R, C) -> s (C,), 1-D, tiles (1, tw)   (a bias gradient)
          s = x.sum(axis=1)   llm_sum_cols(x): x (R, C) -> s (R, 1), 2-D, tiles (th, 1)   (keepdim: a column)
Backward: dx[r, c] = ds[c]    llm_sum_rows_backward(ds, like => x): ds (C,) -> dx of x's shape and tiling
          dx[r, c] = ds[r]    llm_sum_cols_backward(ds, like => x): ds (R, 1) -> dx of x's shape and tiling
A 1-D x (n,) is stored as one row (1, n): llm_sum_rows returns it unchanged as (n,), llm_sum_cols gives (1, 1).

Tiling: one llm_mk_sum call per input tile makes its partial sum (float64 inside, a (1, tw) / (th, 1) float32
tile out), and the llm_tile_sum aggregate (common.py) adds the partials of a tile column / tile row in order.
Measured on 256x256 tiles (1024x768 .. 4096x768) this is ~30% faster than one call per tile column receiving the
ordered array_agg of its tiles: array_agg copies every full tile once more, the partials are tiny.
Backward: one microkernel call per output tile broadcasts the matching ds tile; `like` only gives the shape and
tiling (its tiles are not read). Conventions as matmul: p_out/p_dx DEFAULT NULL allocates a scratch tensor,
p_accumulate adds into it (forward default FALSE; backward default TRUE, gradients accumulate).
The numpy microkernels: py/kernels/reduce.py.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.reduce import broadcast_tile, sum_tile
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT
from pg_llm.ops.elementwise import check_written, eff_tile, lines, n_tiles, not_in_place

SQL_FILE = "kernels/reduce.sql"
ORDER = 11


# ---- SQL ----------------------------------------------------------------------------------------------------

DECLARE = "ra llm_tensor; rb llm_tensor; v_tile INT[]; v_want BIGINT; v_out BIGINT; v_written BIGINT;"

SUM_ROWS = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, 0, t.tc,
           llm_tile_sum(llm_mk_sum(t.data, llm_tile_dim(llm_cols(ra.shape), v_tile[2], t.tc), 0) ORDER BY t.tr)
    FROM llm_tile AS t
    WHERE t.tensor_id = p_x
    GROUP BY t.tc
    """ + UPSERT

SUM_COLS = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, t.tr, 0,
           llm_tile_sum(llm_mk_sum(t.data, llm_tile_dim(llm_rows(ra.shape), v_tile[1], t.tr), 1) ORDER BY t.tc)
    FROM llm_tile AS t
    WHERE t.tensor_id = p_x
    GROUP BY t.tr
    """ + UPSERT

# dx tile (i, tc) for every tile row i of `like`, from ds tile (0, tc) / dx tile (tr, j) from ds tile (tr, 0)
BCAST_ROWS = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, g.i, t.tc, llm_mk_broadcast(t.data, llm_tile_dim(llm_rows(ra.shape), v_tile[1], g.i),
           llm_tile_dim(llm_cols(ra.shape), v_tile[2], t.tc), 0)
    FROM llm_tile AS t
    CROSS JOIN generate_series(0, (llm_rows(ra.shape) - 1) / v_tile[1]) AS g(i)
    WHERE t.tensor_id = p_dy
    """ + UPSERT

BCAST_COLS = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, t.tr, g.j, llm_mk_broadcast(t.data, llm_tile_dim(llm_rows(ra.shape), v_tile[1], t.tr),
           llm_tile_dim(llm_cols(ra.shape), v_tile[2], g.j), 1)
    FROM llm_tile AS t
    CROSS JOIN generate_series(0, (llm_cols(ra.shape) - 1) / v_tile[2]) AS g(j)
    WHERE t.tensor_id = p_dy
    """ + UPSERT

# per axis: result shape, its tiling, the SUM query, the broadcast query, and how ds must look
AXES = {
    "rows": dict(shape="ARRAY[llm_cols(ra.shape)]", tile="ARRAY[1, v_tile[2]]", rows="1",
                 cols="llm_cols(ra.shape)", want="(llm_cols(ra.shape) + v_tile[2] - 1) / v_tile[2]",
                 sum=SUM_ROWS, bcast=BCAST_ROWS, sums="over rows", text="(C,)", out_tile="(1, tw)"),
    "cols": dict(shape="ARRAY[llm_rows(ra.shape), 1]", tile="ARRAY[v_tile[1], 1]", rows="llm_rows(ra.shape)",
                 cols="1", want="(llm_rows(ra.shape) + v_tile[1] - 1) / v_tile[1]",
                 sum=SUM_COLS, bcast=BCAST_COLS, sums="over columns", text="(R, 1)", out_tile="(th, 1)"),
}


def _forward(axis: str) -> str:
    a = AXES[axis]
    op = f"sum_{axis}"
    body = plpgsql(DECLARE, lines(
        f"""
        ra := llm_input(p_x, '{op}', 'x');
        v_tile := {eff_tile("ra")};""",
        not_in_place(op, "p_out", "p_x"),
        f"""
        v_want := {a["want"]};
        v_out := llm_output(p_out, '{op}', {a["shape"]}, {a["tile"]}, p_accumulate);
        @forward;""",
        check_written(op),
        "RETURN v_out;"), forward=a["sum"])
    return function(f"llm_{op}", "p_x BIGINT, p_out BIGINT DEFAULT NULL, p_accumulate BOOLEAN DEFAULT FALSE",
                    "BIGINT", body, settings=KERNEL_SETTINGS, note=f"""
        op: {op} forward. out = x summed {a["sums"]}: x (R, C) -> out {a["text"]}, in float64 then float32.
        tiling: out tiles {a["out_tile"]} with x's tile sizes; out tile = llm_tile_sum of the llm_mk_sum partial sums
        of x's tiles along the summed axis. p_out NULL allocates; p_accumulate adds into p_out.""")


def _backward(axis: str) -> str:
    a = AXES[axis]
    op = f"sum_{axis}_backward"
    body = plpgsql(DECLARE, lines(
        f"""
        ra := llm_input(p_like, '{op}', 'like');
        rb := llm_input(p_dy, '{op}', 'dy');
        v_tile := {eff_tile("ra")};
        IF llm_rows(rb.shape) <> {a["rows"]} OR llm_cols(rb.shape) <> {a["cols"]} THEN
          RAISE EXCEPTION 'pg_llm: {op}: dy "%" has shape %, expected % (the sum_{axis} of like "%" %)',
            rb.name, llm_shape_text(rb.shape), llm_shape_text({a["shape"]}), ra.name, llm_shape_text(ra.shape);
        END IF;
        IF {eff_tile("rb")} <> {a["tile"]} THEN
          RAISE EXCEPTION 'pg_llm: {op}: dy "%" is cut in tiles of %, expected % to match like "%" (tiles %)',
            rb.name, {eff_tile("rb")}, {a["tile"]}, ra.name, v_tile;
        END IF;""",
        not_in_place(op, "p_dx", "p_dy, p_like"),
        f"""
        v_want := {n_tiles("llm_rows(ra.shape)", "llm_cols(ra.shape)", "v_tile")};
        v_out := llm_output(p_dx, '{op}', ra.shape, v_tile, p_accumulate);
        @bcast;""",
        check_written(op),
        "RETURN v_out;"), bcast=a["bcast"])
    return function(f"llm_{op}", "p_dy BIGINT, p_like BIGINT, p_dx BIGINT DEFAULT NULL, "
                    "p_accumulate BOOLEAN DEFAULT TRUE", "BIGINT", body, settings=KERNEL_SETTINGS, note=f"""
        op: sum_{axis} backward (broadcast). dy {a["text"]} -> dx (R, C) with like's shape and tiling,
        dx[r, c] = dy[{"c" if axis == "rows" else "r"}]; dy must be tiled {a["out_tile"]} like llm_sum_{axis}'s output.
        tiling: dx tile (tr, tc) = llm_mk_broadcast(dy tile {"(0, tc)" if axis == "rows" else "(tr, 0)"}).
        p_dx NULL allocates; p_accumulate (default TRUE) adds into p_dx. Returns dx.""")


def emit() -> str:
    mks = [
        microkernel("llm_mk_sum", "data BYTEA, n INT, axis INT", "BYTEA", sum_tile,
                    note="sum microkernel: partial sum of one tile, axis 0 a (h, n) tile over rows -> (1, n), axis 1 "
                         "an (n, w) tile over columns -> (n, 1); float64 inside, float32 out (added by llm_tile_sum)."),
        microkernel("llm_mk_broadcast", "v BYTEA, h INT, w INT, axis INT", "BYTEA", broadcast_tile,
                    note="broadcast microkernel: axis 0 repeats a (1, w) row tile over h rows, axis 1 a (h, 1) column "
                         "tile over w columns -> (h, w)."),
    ]
    return "\n".join([comment(__doc__ or ""), *mks, _forward("rows"), _forward("cols"), _backward("rows"),
                      _backward("cols")])
