"""held: a training step's parameter gradients kept in the backend's memory instead of scratch tiles (the numpy
side and why: py/kernels/held.py).

    llm_mk_hold(tape, on)          start holding tape's gradients (llm_gpt2_loss_backward, p_hold) / drop them
    llm_mk_held_add(dst, src)      dst += src in memory when both are held (llm_grad_acc); FALSE otherwise
    llm_mk_held_sq_norm(id)        sum of squares of a held gradient (llm_global_grad_norm); NULL if not held
    llm_held_write(id)             write a held gradient's tiles (for any other reader) and stop holding it

A held gradient is a tensor row (shape, tiling, its llm_tape_grad row) without tiles; the fused backward kernels
(gpt2_block, gpt2_embed, head_nll) hold what they would have written, and llm_adamw_step reads it from memory.
"""
from __future__ import annotations

from collections.abc import Callable

from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.held import add_kernel, hold_kernel, sq_norm_kernel, write_kernel
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "kernels/held.sql"
ORDER = 34


def _mk(name: str, args: str, returns: str, fn: Callable, call: str, note: str) -> str:
    return function(name, args, returns, kernel_body(fn, call), language="plpython3u", volatility="VOLATILE",
                    strict=True, settings=("jit = off",), note=note)


def emit() -> str:
    out = [
        _mk("llm_mk_hold", "tape BIGINT, hold BOOLEAN", "INT", hold_kernel, "hold_kernel(GD, tape, hold)",
            "Start holding tape's parameter gradients in this backend's memory (TRUE), or drop them (FALSE: returns "
            "how many were held)."),
        _mk("llm_mk_held_add", "dst BIGINT, src BIGINT", "BOOLEAN", add_kernel, "add_kernel(GD, dst, src)",
            "dst += src in memory when both gradients are held (src dropped); FALSE, with nothing done, otherwise."),
        _mk("llm_mk_held_sq_norm", "id BIGINT", "FLOAT8", sq_norm_kernel, "sq_norm_kernel(GD, id)",
            "Sum of squares of a held gradient, in float64; NULL when the tensor is not held."),
        _mk("llm_mk_held_write", "id BIGINT, tile INT[]", "INT", write_kernel, "write_kernel(plpy, GD, id, tile)",
            "Write a held gradient's tiles (tiling tile) and stop holding it; returns the tiles written (0: not "
            "held)."),
    ]
    body = plpgsql("r llm_tensor;", """
        r := llm_input(p_id, 'held_write', 'tensor');
        RETURN llm_mk_held_write(p_id, ARRAY[least(r.tile[1], llm_rows(r.shape)), least(r.tile[2], llm_cols(r.shape))]);
    """)
    out.append(function("llm_held_write", "p_id BIGINT", "INT", body, settings=KERNEL_SETTINGS, note="""
        A held gradient written out as tiles, for a reader that needs them (0 when p_id is not held).""",))
    return "\n".join([comment(__doc__ or ""), *out])
