"""Fused generation (the SQL side: py/ops/decode.py): a whole llm_generate in ONE PL/Python call. The prompt
runs through every layer at once (prefill), then each new token is one row through every layer against the
layers' key/value caches, the LM head and the sampler, all in numpy on the backend's cached weights.

Why: as SQL, a decoding step paid ~100-160 ms of fixed cost per token (statements, scratch tensors, cache rows
inserted and fingerprinted, weight-cache checks per layer); GPT-2 small's arithmetic for a token is a few ms.
Here the weights are checked once per call (one fingerprint query over every parameter's tiles, weight_cache.py),
the caches are numpy arrays of this call, and a token costs its arithmetic plus one tiny query (which lets a
cancel or statement_timeout stop the loop) and, when streaming, a NOTICE.

Same numbers as the SQL paths: the embedding and residual adds in float32, block_rows (the fused block of the
one-token step), layernorm_rows, x @ head^T in float32, sample_logits on the float32 logits row.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.block_step import block_rows, block_shapes
from pg_llm.kernels.layernorm import layernorm_rows
from pg_llm.kernels.runtime import error
from pg_llm.kernels.sampling import sample_logits
from pg_llm.kernels.tiles import block
from pg_llm.kernels.weight_cache import cache_budget, cached_tensors


def check_shapes(w: Sequence[np.ndarray], n_layer: int) -> None:
    """w = [wte, wpe, 12 per layer..., ln_f.weight, ln_f.bias, head]: every shape fits wte's width."""
    V, C = w[0].shape
    if w[1].shape[1] != C or w[-1].shape != (V, C) or w[-3].shape != (1, C) or w[-2].shape != (1, C):
        error('pg_llm: gpt2: wte %s, wpe %s, ln_f %s / %s, head %s do not fit one model'
              % (w[0].shape, w[1].shape, w[-3].shape, w[-2].shape, w[-1].shape))
    for layer in range(n_layer):
        bad = block_shapes(w[2 + 12 * layer:14 + 12 * layer], C)
        if bad:
            i, got, want = bad[0]
            error('pg_llm: gpt2: parameter %d of layer %d has shape %s, expected %s' % (i, layer, got, want))


def model_weights(plpy: Any, GD: dict, params: Sequence[int]) -> list[np.ndarray]:
    """A model's weights (llm_gpt2_param_ids order) from the backend's weight cache, checked to fit together."""
    if (len(params) - 5) % 12 or len(params) < 17:
        error('pg_llm: gpt2: %d parameter ids, expected wte, wpe, 12 per layer, ln_f and the head' % len(params))
    w = cached_tensors(plpy, GD, params, block, cache_budget(plpy, GD))
    check_shapes(w, (len(params) - 5) // 12)
    return w


def generate(w: Sequence[np.ndarray], tokens: Sequence[int], n_head: int, eps: float, n_ctx: int, max_new: int,
             sampling: tuple[float, int, float, int], eos: int | None,
             each: Callable[[int, int], None]) -> tuple[list[int], bool]:
    """The new tokens after `tokens` (and whether the context stopped them), each(step, token) called as each
    is drawn. w as check_shapes; sampling = (temperature, top_k, top_p, seed)."""
    n_layer = (len(w) - 5) // 12
    wte, wpe, lnf_g, lnf_b, head = w[0], w[1], w[-3], w[-2], w[-1]
    C = wte.shape[1]
    kv = np.empty((n_layer, min(n_ctx, len(tokens) + max_new), 2 * C), dtype=np.float32)
    new: list[int] = []
    past, inp = 0, list(tokens)
    for i in range(max_new):
        if past + len(inp) > n_ctx:
            return new, True
        x = wte[inp] + wpe[past:past + len(inp)]
        for layer in range(n_layer):
            x = block_rows(x, w[2 + 12 * layer:14 + 12 * layer], kv[layer], past, n_head, eps)
        past += len(inp)
        logits = np.matmul(layernorm_rows(x[-1:], lnf_g, lnf_b, eps), head.T)
        tok = sample_logits(logits.astype('<f4').tobytes(), *sampling, i, False)
        each(i, tok)
        new.append(tok)
        inp = [tok]
        if tok == eos:
            break
    return new, False


def generate_kernel(plpy: Any, GD: dict, params: Sequence[int], tokens: Sequence[int], n_head: int, eps: float,
                    n_ctx: int, max_new: int, temperature: float, top_k: int, top_p: float, seed: int,
                    eos: int | None, tokenizer: str | None, model: str) -> list[int]:
    """llm_mk_gpt2_generate: weights from the weight cache (checked once), then generate(); with a tokenizer a
    NOTICE per token ('pg_llm: step i: token id "text"', as the SQL loop raises it)."""
    w = model_weights(plpy, GD, params)
    tick = GD.get('llm_gen_tick')
    if tick is None:
        tick = GD['llm_gen_tick'] = plpy.prepare("SELECT 1", [])
    text = GD.get('llm_gen_text')
    if text is None:
        text = GD['llm_gen_text'] = plpy.prepare("SELECT to_json(llm_decode(ARRAY[$1], $2))::TEXT AS t",
                                                 ['int', 'text'])

    def each(i: int, tok: int) -> None:
        plpy.execute(tick)  # a cancel or statement_timeout raises here
        if tokenizer is not None:
            plpy.notice('pg_llm: step %d: token %d %s' % (i, tok, plpy.execute(text, [tok, tokenizer])[0]['t']))

    new, full = generate(w, tokens, n_head, eps, n_ctx, max_new, (temperature, top_k, top_p, seed), eos, each)
    if full:
        plpy.notice('pg_llm: generation stopped after %d of %d new tokens: the sequence fills the context of %d '
                    'tokens of model "%s"' % (len(new), max_new, n_ctx, model),
                    hint='A token is predicted from at most n_ctx tokens: shorten the prompt for more.')
    return new
