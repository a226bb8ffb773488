"""grad_norm: squared norms, the global gradient norm and the clip coefficient of
torch.nn.utils.clip_grad_norm_.

    llm_sq_norm(t)             sum of squares of a tensor, float64 (one microkernel call per tile + SQL sum)
    llm_global_grad_norm(ids)  sqrt(sum over the tensors of llm_sq_norm): the L2 norm of all gradients together
    llm_clip_coef(norm, max)   min(1, max / (norm + 1e-6)), as clip_grad_norm_ scales the gradients; max NULL or
                               <= 0 disables clipping (1); a non-finite norm gives NaN (skip the step)

Clipping is applied by the optimizer: llm_adamw_step(..., p_grad_scale => llm_clip_coef(norm, 1.0)) multiplies
each gradient by the coefficient before using it, so the gradients themselves are never rewritten. Missing tiles
make llm_sq_norm fail instead of returning a partial norm. The numpy microkernel: py/kernels/grad_norm.py.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.kernels.grad_norm import sq_sum_tile
from pg_llm.ops.common import KERNEL_SETTINGS
from pg_llm.ops.elementwise import n_tiles

SQL_FILE = "kernels/grad_norm.sql"
ORDER = 41

CLIP_EPS = "1e-6"  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6)


SQ_NORM = """
    SELECT count(*) AS n, sum(llm_mk_sq_sum(t.data)) AS s
    FROM llm_tile AS t
    WHERE t.tensor_id = p_tensor"""


def _sq_norm() -> str:
    body = plpgsql("r llm_tensor; v_n BIGINT; v_want BIGINT; v_sum FLOAT8;", f"""
        r := llm_input(p_tensor, 'sq_norm', 'tensor');
        v_want := {n_tiles("llm_rows(r.shape)", "llm_cols(r.shape)", "r.tile")};
        SELECT q.n, q.s INTO v_n, v_sum FROM (
          @q
        ) AS q;
        IF v_n <> v_want THEN
          RAISE EXCEPTION 'pg_llm: sq_norm: tensor "%" (id %) has % of its % tiles', r.name, p_tensor, v_n, v_want
            USING HINT = 'Check it with llm_tensor_validate(id); a gradient never written can be zeroed with '
                         'llm_tensor_zero(id).';
        END IF;
        RETURN v_sum;
    """, q=SQ_NORM)
    return function("llm_sq_norm", "p_tensor BIGINT", "FLOAT8", body, volatility="STABLE",
                    settings=KERNEL_SETTINGS, note="""
        op: squared L2 norm of a tensor, sum(x^2) accumulated in float64.
        tiling: one llm_mk_sq_sum call per tile, summed in SQL; every tile must be present.""")


def _global_norm() -> str:
    body = plpgsql("", """
        IF p_ids IS NULL OR array_position(p_ids, NULL) IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: global_grad_norm: tensor ids must not be NULL, got %', p_ids;
        END IF;
        RETURN (
          @q
        );
    """, q="SELECT sqrt(coalesce(sum(coalesce(llm_mk_held_sq_norm(u.id), llm_sq_norm(u.id))), 0)) "
           "FROM unnest(p_ids) AS u(id)")
    return function("llm_global_grad_norm", "p_ids BIGINT[]", "FLOAT8", body, volatility="STABLE",
                    settings=KERNEL_SETTINGS, note="""
        op: global gradient norm sqrt(sum over tensors of sum(g^2)), the total_norm of
        torch.nn.utils.clip_grad_norm_ (norm_type 2); an empty array gives 0. A tensor listed twice counts twice. A
        gradient held in memory (ops/held.py) is read there.""")


def _clip_coef() -> str:
    return function("llm_clip_coef", "p_norm FLOAT8, p_max_norm FLOAT8", "FLOAT8", f"""
        SELECT CASE
          WHEN p_max_norm IS NULL OR p_max_norm <= 0 THEN 1.0::FLOAT8
          WHEN p_norm IS NULL THEN NULL::FLOAT8
          WHEN p_norm = 'NaN'::FLOAT8 OR p_norm = 'Infinity'::FLOAT8 THEN 'NaN'::FLOAT8
          ELSE least(1.0::FLOAT8, p_max_norm / (p_norm + {CLIP_EPS}))
        END""", language="sql", volatility="IMMUTABLE", parallel="SAFE", note=f"""
        Clip coefficient of torch.nn.utils.clip_grad_norm_: min(1, max_norm / (norm + {CLIP_EPS})), to multiply the
        gradients by (llm_adamw_step's p_grad_scale). max_norm NULL or <= 0 disables clipping (1); otherwise a
        NULL norm gives NULL and a NaN or infinite norm NaN, which llm_adamw_step refuses (skip the step).""")


def emit() -> str:
    mk = microkernel("llm_mk_sq_sum", "x BYTEA", "FLOAT8", sq_sum_tile,
                     note="sq_norm microkernel: sum of squares of one tile (h, w) -> float8, accumulated in float64.")
    return "\n".join([comment(__doc__ or "") + "\n", mk, _sq_norm(), _global_norm(), _clip_coef()])
