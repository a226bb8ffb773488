"""gpt2_logits / gpt2_window_nll: GPT-2 inference forwards in one PL/Python call on the backend's cached weights
(the numpy side and why: py/kernels/score.py). llm_logits, llm_logits_all, llm_loss and llm_perplexity* take
this path; pg_llm.fused_forward = off keeps the kernel chain (llm_gpt2_forward, llm_gpt2_forward_cached), the
reference the training forward shares."""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, kernel_body
from pg_llm.kernels.score import logits_kernel, nll_kernel

SQL_FILE = "kernels/score.sql"
ORDER = 34

# the SQL condition of the fused inference path (a setting, so that the chain stays reachable as the reference)
FUSED = "coalesce(current_setting('pg_llm.fused_forward', TRUE), '') <> 'off'"


def emit() -> str:
    logits = function(
        "llm_mk_gpt2_logits", "params BIGINT[], tokens INT[], first INT, n_head INT, eps FLOAT8", "BYTEA",
        kernel_body(logits_kernel, "logits_kernel(plpy, GD, params, tokens, first, n_head, eps)"),
        language="plpython3u", volatility="STABLE", strict=True, settings=("jit = off",), note="""
        op: GPT-2 forward of one sequence (n <= n_ctx tokens) -> float32 logits of rows first .. n-1, row-major
        ((n - first) x V floats). params: llm_gpt2_param_ids; the caller validates tokens.""")
    nll = function(
        "llm_mk_gpt2_window_nll",
        "params BIGINT[], x INT[], y INT[], wb INT[], we INT[], ws INT[], n_head INT, eps FLOAT8", "FLOAT8[]",
        kernel_body(nll_kernel, "nll_kernel(plpy, GD, params, x, y, wb, we, ws, n_head, eps)"),
        language="plpython3u", volatility="STABLE", strict=True, settings=("jit = off",), note="""
        op: for each window k (0-based, half-open: tokens x[wb[k]:we[k]], each at most n_ctx) the float64 sum of
        NLL(y[i] | x[wb[k] .. i]) over i in [ws[k], we[k]); windows packed up to 4,096 rows per forward.""")
    return "\n".join([comment(__doc__ or ""), logits, nll])
