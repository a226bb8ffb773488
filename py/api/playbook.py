"""The user's GPT-2 reproduction playbook (../shared/seed-playbook.md) calls some functions with an earlier
implementation's argument lists. These are thin overloads over pg_llm's own functions (no second code path):

    llm_loss('gpt2-small', seq, target, 12, 12, 768, 50257, training => false)   -- explicit dims, checked
    llm_generate(prompt, max_tokens, temperature, topk, topp, model_name, eos)    -- prompt-first order
    llm_generate_stream(prompt, max_tokens, temperature, topk, topp, model_name, eos)
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "api/playbook.sql"
ORDER = 90


def _loss() -> str:
    body = plpgsql("c llm_model_config;", """
        c := llm_model_get(model);
        IF (n_layer, n_head, n_embd, vocab_size) IS DISTINCT FROM (c.n_layer, c.n_head, c.n_embd, c.vocab_size) THEN
          RAISE EXCEPTION 'pg_llm: llm_loss: model "%" has n_layer %, n_head %, n_embd %, vocab_size %; the call '
            'says %, %, %, %', model, c.n_layer, c.n_head, c.n_embd, c.vocab_size, n_layer, n_head, n_embd,
            vocab_size USING HINT = 'Drop the dimensions (llm_loss(model, tokens, targets)) or fix them.';
        END IF;
        RETURN llm_loss(model, tokens, targets, training);
    """)
    return function("llm_loss", "model TEXT, tokens INT[], targets INT[], n_layer INT, n_head INT, n_embd INT, "
                    "vocab_size INT, training BOOLEAN DEFAULT FALSE", "FLOAT8", body, settings=KERNEL_SETTINGS,
                    note="Playbook form of llm_loss with explicit dimensions, which must match the model's config.")


def _generate() -> str:
    args = ("prompt TEXT, max_tokens INT, temperature FLOAT8, topk INT, topp FLOAT8, model_name TEXT, "
            "eos BOOLEAN DEFAULT TRUE, seed BIGINT DEFAULT 0")
    call = ("model_name, prompt, max_new_tokens => max_tokens, temperature => temperature, top_k => topk, "
            "top_p => topp, seed => seed, eos => eos")
    out = [function("llm_generate", args, "TEXT", f"SELECT llm_generate({call})", language="sql",
                    settings=KERNEL_SETTINGS,
                    note="Playbook argument order of llm_generate(model, prompt, ...): eos true stops at "
                         "<|endoftext|>; topk 0 / topp 1 disable the filters; seed makes it reproducible.")]
    out.append(function("llm_generate_stream", args, "TABLE(step INT, token_id INT, token TEXT)",
                        f"SELECT * FROM llm_generate_stream({call})", language="sql", settings=KERNEL_SETTINGS,
                        note="Playbook argument order of llm_generate_stream(model, prompt, ...)."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _loss(), _generate()])
