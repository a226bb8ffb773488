"""Shared pieces of every op: output allocation/checks, tile accumulation, the bytea tile-sum aggregate.

Every kernel writes into an output tensor `p_out`: NULL allocates a scratch tensor; an existing tensor must
have the expected shape and tile; with p_accumulate the result is added into its tiles (ON CONFLICT ...
DO UPDATE), which is how backward kernels accumulate gradients. The numpy microkernel (the tile sum):
py/kernels/common.py."""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.gen.sqlfmt import raw_ddl
from pg_llm.gen.surface import qualified
from pg_llm.kernels.common import add_tiles

SQL_FILE = "kernels/02_common.sql"
ORDER = 2

KERNEL_SETTINGS = ("jit = off",)  # JIT adds 0.5-2 s to short analytic queries; kernels never benefit.
UPSERT = "ON CONFLICT (tensor_id, tr, tc) DO UPDATE SET data = llm_mk_add(llm_tile.data, excluded.data)"


def insert_rows(src: str, call: str) -> str:
    """The INSERT of a microkernel's (k, tr, tc, data) rows into tensor v_ids[k + 1], `call` receiving every tile
    of tensor `src` in (tr, tc) order as d.tiles (the fused backward kernels: several outputs from one call)."""
    return f"""
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_ids[o.k + 1], o.tr, o.tc, o.data
    FROM (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles FROM llm_tile AS t WHERE t.tensor_id = {src}
    ) AS d
    CROSS JOIN LATERAL {call} AS o"""


def emit() -> str:
    out = [microkernel("llm_mk_add", "a BYTEA, b BYTEA", "BYTEA", add_tiles,
                       note="Elementwise sum of two tiles of the same shape (accumulation, tile-sum aggregate).")]
    out.append(comment("Sum of tiles of one shape: reduces per-block partial results (e.g. bias gradients).") + "\n"
               + raw_ddl(f"CREATE AGGREGATE {qualified('llm_tile_sum')}(BYTEA) (SFUNC = llm_mk_add, STYPE = BYTEA)")
               + ";\n")
    body = plpgsql("r llm_tensor;", """
        SELECT * INTO r FROM llm_tensor WHERE id = p_id;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'pg_llm: %: input % (tensor id %) does not exist', p_op, p_arg, p_id
            USING HINT = 'Look the tensor up with llm_tensor(model, name) or in the llm_tensors view.';
        END IF;
        RETURN r;
    """)
    out.append(function("llm_input", "p_id BIGINT, p_op TEXT, p_arg TEXT", "llm_tensor", body, volatility="STABLE",
                        note="Catalog row of a kernel input, or an error naming the op and argument."))
    body = plpgsql("r llm_tensor;", """
        IF p_out IS NULL THEN
          RETURN llm_tensor_create(p_name, p_shape, p_tile);
        END IF;
        r := llm_input(p_out, p_name, 'out');
        IF llm_rows(r.shape) <> llm_rows(p_shape) OR llm_cols(r.shape) <> llm_cols(p_shape) OR r.tile <> p_tile THEN
          RAISE EXCEPTION 'pg_llm: %: output tensor "%" has shape % tile %, expected shape % tile %',
            p_name, r.name, llm_shape_text(r.shape), r.tile, llm_shape_text(p_shape), p_tile;
        END IF;
        IF NOT p_accumulate THEN
          DELETE FROM llm_tile WHERE tensor_id = p_out;
        END IF;
        RETURN p_out;
    """)
    out.append(function("llm_output", "p_out BIGINT, p_name TEXT, p_shape INT[], p_tile INT[], p_accumulate BOOLEAN",
                        "BIGINT", body,
                        note="Allocate (p_out NULL) or check and prepare the output tensor of a kernel."))
    return "\n".join(out)
