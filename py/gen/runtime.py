"""PL/Python runtime: numpy boot, tile <-> float4[] conversion, plain-SQL inspection, llm_doctor()."""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, kernel_body, microkernel, plpgsql, stmt
from pg_llm.kernels.doctor import doctor
from pg_llm.kernels.tiles import block_rows_skip, list_to_tile, tile_stats, tile_to_list, tile_to_rows

SQL_FILE = "kernels/01_runtime.sql"
ORDER = 1

# llm_py_boot compiles pg_llm.kernels.loader from llm_py_module and lets it install the finder that imports
# every other pg_llm.kernels module from there (and numpy first from pg_llm's pip wheel): py/kernels/loader.py.
BOOT = """
src = plpy.execute("SELECT m.source FROM llm_py_module AS m WHERE m.name = 'pg_llm.kernels.loader'")[0]['source']
ns = {'__name__': 'pg_llm_boot'}
exec(compile(src, 'llm_py_module:pg_llm.kernels.loader', 'exec'), ns)
return ns['install'](plpy, GD)"""


def _codecs() -> str:
    out = [function("llm_py_boot", "", "BOOLEAN", BOOT, language="plpython3u",
                    note="""Once per backend (PL/Python bodies call it when GD lacks pg_llm_boot; call it by hand
                    to reload after a reinstall): the finder that imports pg_llm.kernels.* from llm_py_module,
                    and numpy (pg_llm's pip wheel first on sys.path).""")]
    out.append(microkernel("llm_tile_to_float4", "data BYTEA", "FLOAT4[]", tile_to_list,
                           note="A tile payload as a flat float4[] (row-major)."))
    out.append(microkernel("llm_tile_to_float4_2d", "data BYTEA, cols INT", "FLOAT4[]", tile_to_rows,
                           note="A tile payload as float4[rows][cols]."))
    out.append(microkernel("llm_float4_to_tile", "vals FLOAT4[]", "BYTEA", list_to_tile,
                           note="float4[] (any dimensions, row-major) to a raw little-endian float32 payload."))
    out.append(microkernel("llm_tile_stats", "data BYTEA", "FLOAT8[]", tile_stats,
                           note="[n, min, max, sum, sum of squares, NaN count] of one tile, in float64."))
    return "\n".join(out)


def _inspect() -> str:
    out = []
    tile_q = ("SELECT t.data FROM llm_tile AS t WHERE t.tensor_id = p_tensor AND t.tr = p_tile_row "
                 "AND t.tc = p_tile_col")
    for fname, expr, ret in (("llm_tile_values", "llm_tile_to_float4(v_data)", "FLOAT4[]"),
                             ("llm_tile_values_2d", "llm_tile_to_float4_2d(v_data, llm_tile_dim("
                              "llm_cols(r.shape), r.tile[2], p_tile_col))", "FLOAT4[]")):
        body = plpgsql("r llm_tensor; v_data BYTEA;", f"""
            r := llm_tensor_get(p_tensor);
            v_data := (
              @tile_q
            );
            IF v_data IS NULL THEN
              RAISE EXCEPTION 'pg_llm: tensor "%" (id %) has no tile (%, %)', r.name, p_tensor, p_tile_row, p_tile_col
                USING HINT = format('shape %s is cut in tiles of %s', llm_shape_text(r.shape), r.tile);
            END IF;
            RETURN {expr};
        """, tile_q=tile_q)
        out.append(function(fname, "p_tensor BIGINT, p_tile_row INT, p_tile_col INT", ret, body,
                            volatility="STABLE", note=f"Tile (tile_row, tile_col) of a tensor as {ret} "
                            + ("(flat, row-major)." if fname == "llm_tile_values" else "(2-D).")))
    out.append(stmt("""
        CREATE VIEW llm_tensors AS
        SELECT v.id, v.model, v.name, v.role, v.shape, v.tile, s.tiles, s.bytes, s.min, s.max,
               s.total / nullif(s.n, 0) AS mean, sqrt(s.sumsq) AS l2_norm, s.nans
        FROM llm_tensor AS v
        LEFT JOIN LATERAL (
          SELECT count(*) AS tiles, coalesce(sum(length(t.data)), 0)::BIGINT AS bytes, sum(st[1]) AS n,
                 min(st[2]) AS min, max(st[3]) AS max, sum(st[4]) AS total, sum(st[5]) AS sumsq,
                 sum(st[6])::BIGINT AS nans
          FROM llm_tile AS t
          CROSS JOIN LATERAL llm_tile_stats(t.data) AS st
          WHERE t.tensor_id = v.id
        ) AS s ON TRUE""", "Every tensor with shape, tile count, bytes, min/max/mean and L2 norm (computed)."))
    rows = ("""
        SELECT b.r, b.v FROM (
          SELECT t.tr, array_agg(t.data ORDER BY t.tc) AS tiles
          FROM llm_tile AS t
          WHERE t.tensor_id = p_tensor AND t.tr BETWEEN v_first / r.tile[1] AND v_last / r.tile[1]
          GROUP BY t.tr
        ) AS g
        CROSS JOIN LATERAL llm_block_rows(g.tiles, llm_tile_dim(llm_rows(r.shape), r.tile[1], g.tr),
          greatest(v_first, g.tr * r.tile[1]),
          least(v_last, g.tr * r.tile[1] + r.tile[1] - 1) - greatest(v_first, g.tr * r.tile[1]) + 1,
          greatest(v_first, g.tr * r.tile[1]) - g.tr * r.tile[1]) AS b
        ORDER BY b.r""")
    out.append(microkernel("llm_block_rows", "tiles BYTEA[], rows INT, first INT, count INT, skip INT",
                           "TABLE(r INT, v FLOAT4[])", block_rows_skip,
                           note="Rows of one tile-row block (tiles ordered by column) as (row, float4[])."))
    body = plpgsql("r llm_tensor; v_first INT; v_last INT;", """
        r := llm_tensor_get(p_tensor);
        IF p_first_row IS NULL OR p_first_row < 0 OR p_n_rows < 0 THEN
          RAISE EXCEPTION 'pg_llm: llm_tensor_rows: the first row and the number of rows must be >= 0, got % and %',
            coalesce(p_first_row::TEXT, 'NULL'), p_n_rows
            USING HINT = format('Tensor "%s" has rows 0 to %s; p_n_rows NULL reads to the end.', r.name,
                                llm_rows(r.shape) - 1);
        END IF;
        v_first := p_first_row;
        v_last := least(llm_rows(r.shape), v_first + coalesce(p_n_rows, llm_rows(r.shape))) - 1;
        RETURN QUERY
        @rows;
    """, rows=rows)
    out.append(function("llm_tensor_rows", "p_tensor BIGINT, p_first_row INT DEFAULT 0, p_n_rows INT DEFAULT NULL",
                        "TABLE(row_index INT, vals FLOAT4[])", body, volatility="STABLE",
                        note="A slice of a tensor as rows: (row_index, float4[] of the whole row)."))
    return "\n".join(out)


def emit() -> str:
    checks = function("llm_doctor", "", "TABLE(check_name TEXT, value TEXT, status TEXT)",
                      kernel_body(doctor, "doctor(plpy)"), language="plpython3u",
                      note="Server, plpython3u, numpy, BLAS, cores, sgemm speed, with warnings on slow BLAS.")
    return "\n".join([comment(__doc__ or ""), _codecs(), _inspect(), checks])
