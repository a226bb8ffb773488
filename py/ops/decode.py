"""gpt2_generate: a whole generation (prefill, every new token through every layer, LM head, sampling) in one
PL/Python call on the backend's cached weights; the numpy side and why: py/kernels/decode.py. llm_generate*
take this path with the KV cache on (pg_llm.fused_decode = off keeps the SQL loop over llm_gpt2_forward_cached,
the reference)."""
from __future__ import annotations

from pg_llm.config import LN_F, UNTIED_HEAD, WPE, WTE
from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.decode import generate_kernel

SQL_FILE = "kernels/decode.sql"
ORDER = 33

ARGS = ("params BIGINT[], tokens INT[], n_head INT, eps FLOAT8, n_ctx INT, max_new INT, temperature FLOAT8, "
        "top_k INT, top_p FLOAT8, seed BIGINT, eos INT, tokenizer TEXT, model TEXT")


def emit() -> str:
    call = ("generate_kernel(plpy, GD, params, tokens, n_head, eps, n_ctx, max_new, temperature, top_k, top_p, "
            "seed, eos, tokenizer, model)")
    kernel = function(
        "llm_mk_gpt2_generate", ARGS, "INT[]", kernel_body(generate_kernel, call), language="plpython3u",
        volatility="VOLATILE", settings=("jit = off",), note="""
        op: GPT-2 generation in one call. params: llm_gpt2_param_ids (wte, wpe, 12 per layer, ln_f, head), tokens:
        the prompt, then max_new tokens drawn like llm_mk_sample (temperature, top_k, top_p, seed, step); stops
        after eos (NULL: never) or when the context is full (a NOTICE). tokenizer (NULL: quiet): a NOTICE per
        token. Returns the new token ids. Validates nothing else: llm_generate_check does.""")
    body = plpgsql("v_layers INT; v_tied BOOLEAN;", f"""
        SELECT m.n_layer, m.tied_embeddings INTO v_layers, v_tied FROM llm_model_get(p_model) AS m;
        RETURN ARRAY[llm_param(p_model, '{WTE}'), llm_param(p_model, '{WPE}')]
          || llm_gpt2_block_params(p_model, v_layers)
          || ARRAY[llm_param(p_model, '{LN_F.params[0]}'), llm_param(p_model, '{LN_F.params[1]}'),
                   llm_param(p_model, CASE WHEN v_tied THEN '{WTE}' ELSE '{UNTIED_HEAD[0]}' END)];
    """)
    ids = function("llm_gpt2_param_ids", "p_model TEXT", "BIGINT[]", body, volatility="STABLE",
                   note="The parameter ids of a GPT-2 model in llm_mk_gpt2_generate's order (or the error of the "
                        "first missing one).")
    return "\n".join([comment(__doc__ or ""), kernel, ids])
