"""Sampling from a GPT-2 model with a key/value cache: llm_generate_tokens, llm_generate, llm_generate_stream.

llm_generate_tokens(model, tokens, ...) returns prompt + new token ids (like transformers' generate);
llm_generate(model, prompt, ...) returns the text of the new tokens only (prompt encoded with llm_encode, new
ids decoded with llm_decode, the model config's tokenizer); llm_generate_stream returns one row per new
token (step, token_id, token text) and raises a NOTICE per token while it runs, so psql shows progress.

Decoding (llm_generate_steps): with the cache on (the default) the whole generation is ONE call of
llm_mk_gpt2_generate (ops/decode.py, kernels/decode.py): prefill, every new token through every layer, the LM
head and the sampler in numpy on the backend's cached weights, checked once per call; a token costs its
arithmetic (GPT-2 small ~42 ms on 2 cores, 1.9x transformers' tokens/s; a 2 x 64 model ~2 ms). Setting
pg_llm.fused_decode = off keeps the SQL loop below, the reference (same tokens, same NOTICEs).

SQL loop: prefill runs the whole prompt through llm_gpt2_forward_cached once, which
appends every layer's keys/values to that layer's cache (llm_kv_cache_create: scratch tensors of role
'cache'); each later step feeds only the newest token (one row through every layer, attending to the cached
rows), so the cost of a token does not grow with the prefix beyond reading the cache. use_cache => false
recomputes the whole sequence every step (the reference path). Only the last row's logits are computed.
A one-token step runs each layer as ONE llm_mk_gpt2_block_step call (ops/block_step.py: same numbers as the
kernel chain, without its ~14 kernel calls and scratch tensors per layer); weights and cache rows come from
the backend's weight cache (ops/weight_cache.py), so a step reads only what changed since the last one
(~20 tokens/s for GPT-2 small on 2 cores, against ~0.7 reading every tile per step). Setting
pg_llm.fused_decode = off keeps the kernel chain; pg_llm.weight_cache_mb = 0 disables the cache.

Sampling (llm_mk_sample, on the float32 logits row, in float64): temperature 0 is greedy (argmax, first
maximum); otherwise logits / temperature, then top-k (keep the scores >= the k-th largest; 0 disables), then
top-p (sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, always keep the most
likely; 1 disables): the semantics of transformers' TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper applied in that order, as generate() does. The draw uses numpy's
Generator(PCG64(SeedSequence([seed, step]))) with step = 0 for the first new token: the same seed gives the
same tokens in any session and on any server with the same numpy. The numpy microkernel:
py/kernels/sampling.py.

Stopping: after max_new_tokens; at the tokenizer's <|endoftext|> (50256 when the tokenizer has none) when
eos is true (the eos token is returned, as transformers does); and when the sequence fills the context: a
token is produced from at most n_ctx tokens, so at most n_ctx - len(prompt) + 1 new tokens, after which a
NOTICE says generation stopped at the context length (not an error). Inputs are validated before anything
is written. Scratch tensors (activations, caches) are released at the end; a failed or cancelled call rolls
its transaction back, which removes the scratch tensors it created (they are ordinary rows), so nothing
leaks; llm_scratch_clear() drops those of backends that died.
"""
from __future__ import annotations

import textwrap

from pg_llm.api.gpt2 import HEAD, TILE_ROWS
from pg_llm.config import BLOCK, LN_F, WPE, WTE, Step
from pg_llm.gen.emit import comment, function, microkernel, plpgsql
from pg_llm.gen.sqlfmt import sql
from pg_llm.kernels.sampling import sample_logits
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "api/generate.sql"
ORDER = 84

EOS_TEXT = "<|endoftext|>"
EOS_DEFAULT = 50256


def _sampling() -> str:
    out = []
    for name, ret, keep in (("llm_mk_sample", "INT", "False"), ("llm_mk_sample_keep", "INT[]", "True")):
        out.append(microkernel(
            name, "logits BYTEA, temperature FLOAT8, top_k INT, top_p FLOAT8, seed BIGINT, step INT", ret,
            sample_logits, f"sample_logits(logits, temperature, top_k, top_p, seed, step, {keep})",
            note="sampling microkernel: " + ("the token drawn from" if keep == "False" else "the ids kept by the "
                 "temperature/top-k/top-p filters of") + " one float32 logits row (see api/generate.sql)."))
    body = plpgsql("", """
        IF p_temperature IS NULL OR NOT (p_temperature >= 0 AND p_temperature < 'Infinity') THEN
          RAISE EXCEPTION 'pg_llm: %: temperature must be a finite number >= 0, got %', p_op, p_temperature
            USING HINT = '0 is greedy decoding (argmax); 1 samples from the model''s distribution.';
        END IF;
        IF p_top_k IS NULL OR p_top_k < 0 THEN
          RAISE EXCEPTION 'pg_llm: %: top_k must be >= 0, got %', p_op, p_top_k
            USING HINT = 'top_k => 0 keeps every token; top_k => 50 keeps the 50 most likely.';
        END IF;
        IF p_top_p IS NULL OR NOT (p_top_p > 0 AND p_top_p <= 1) THEN
          RAISE EXCEPTION 'pg_llm: %: top_p must be in (0, 1], got %', p_op, p_top_p
            USING HINT = 'top_p => 1 disables nucleus sampling; 0.9 keeps the most likely tokens totalling 90%.';
        END IF;
        IF p_seed IS NULL OR p_seed < 0 THEN
          RAISE EXCEPTION 'pg_llm: %: seed must be >= 0, got %', p_op, p_seed
            USING HINT = 'The same seed gives the same tokens in any session.';
        END IF;
    """)
    out.append(function("llm_sampling_check", "p_op TEXT, p_temperature FLOAT8, p_top_k INT, p_top_p FLOAT8, "
                        "p_seed BIGINT", "VOID", body, volatility="IMMUTABLE",
                        note="Validate sampling parameters (clear errors naming the caller)."))
    args = "logits FLOAT4[], temperature FLOAT8 DEFAULT 1.0, top_k INT DEFAULT 0, top_p FLOAT8 DEFAULT 1.0"
    check = """
        PERFORM llm_sampling_check('{fn}', temperature, top_k, top_p, {seed});
        IF logits IS NULL OR cardinality(logits) = 0 THEN
          RAISE EXCEPTION 'pg_llm: {fn}: logits must be a non-empty float4[]'
            USING HINT = 'Pass one row of logits, e.g. llm_logits(model, tokens).';
        END IF;
        RETURN {call}(llm_float4_to_tile(logits), temperature, top_k, top_p, {seed}, {step});"""
    out.append(function("llm_sample_keep", args, "INT[]",
                        plpgsql("", check.format(fn="llm_sample_keep", seed="0", step="0", call="llm_mk_sample_keep")),
                        volatility="IMMUTABLE", note="The token ids (ascending) that temperature, top-k and top-p "
                        "keep in a logits row: the support llm_generate samples from."))
    out.append(function("llm_sample", args + ", seed BIGINT DEFAULT 0, step INT DEFAULT 0", "INT",
                        plpgsql("", check.format(fn="llm_sample", seed="seed", step="step", call="llm_mk_sample")),
                        volatility="IMMUTABLE", note="One token drawn from a logits row exactly as llm_generate "
                        "draws the token of a step (same seed and step, same token)."))
    return "\n".join(out)


def _lin(x: str, step: Step) -> str:
    """GPT-2 Conv1D x @ weight [in, out] + bias of layer `pre` (a PL/pgSQL expression)."""
    w, b = step.params
    return f"llm_add_bias(llm_matmul({x}, llm_param(p_model, pre || '{w}')), llm_param(p_model, pre || '{b}'))"


def _layer() -> str:
    """config.BLOCK for layer `pre` as the chain of kernels (PL/pgSQL), attending to the KV caches when given."""
    out = []
    for s in BLOCK:
        if s.op == "layernorm":
            w, b = s.params
            out.append(f"h := llm_layernorm(x, llm_param(p_model, pre || '{w}'), llm_param(p_model, pre || '{b}'),\n"
                       "                   NULL, c.layer_norm_epsilon);")
        elif s.op == "attention":
            out.append("IF p_caches IS NULL THEN\n  h := llm_attention(h, c.n_head, n);\nELSE\n"
                       "  h := llm_attention_cached(h, p_caches[layer + 1], p_past, c.n_head);\nEND IF;")
        elif s.residual:
            out.append(f"x := llm_add(x, {_lin('h', s)});")
        else:
            out.append(f"h := {'llm_gelu(' + _lin('h', s) + ')' if s.gelu else _lin('h', s)};")
    return textwrap.indent("\n".join(out), " " * 10)


BAD_CACHE = """
    SELECT u.id FROM unnest(p_caches) AS u(id) LEFT JOIN llm_tensor AS v ON v.id = u.id
    WHERE v.id IS NULL OR llm_rows(v.shape) <= p_past OR llm_cols(v.shape) <> 2 * c.n_embd
      OR v.tile <> ARRAY[1, 2 * c.n_embd]
    LIMIT 1"""
X_ROW = "SELECT string_agg(t.data, ''::BYTEA ORDER BY t.tc) FROM llm_tile AS t WHERE t.tensor_id = x"
APPEND = "INSERT INTO llm_tile (tensor_id, tr, tc, data) VALUES (p_caches[layer + 1], p_past, 0, v_out[2])"
X_WRITE = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT x, 0, j.j, substring(v_row FROM j.j * rx.tile[2] * 4 + 1 FOR rx.tile[2] * 4)
    FROM generate_series(0, (c.n_embd - 1) / rx.tile[2]) AS j(j)"""


def _forward() -> str:
    layer = "\n          pre := 'h.' || layer || '.';\n" + _layer()
    body = plpgsql("""
        c llm_model_config; n INT := cardinality(p_tokens); v_from INT; x BIGINT; h BIGINT; pre TEXT;
        rx llm_tensor; v_ids BIGINT[]; v_row BYTEA; v_out BYTEA[]; v_bad BIGINT;
    """, f"""
        c := llm_gpt2_check_input(p_model, p_tokens, n);
        PERFORM llm_model_read_lock(p_model);
        v_from := coalesce(p_logits_from, n - 1);
        IF p_past IS NULL OR p_past < 0 OR p_past + n > c.n_ctx OR (p_caches IS NULL AND p_past <> 0) THEN
          RAISE EXCEPTION 'pg_llm: model "%": positions % .. % are outside its context of % (or past tokens '
            'without caches)', p_model, p_past, p_past + n - 1, c.n_ctx
            USING HINT = 'p_past counts the tokens already in the caches (0 for a prompt); the sequence must fit '
              'the context.';
        END IF;
        IF p_caches IS NOT NULL AND cardinality(p_caches) IS DISTINCT FROM c.n_layer THEN
          RAISE EXCEPTION 'pg_llm: model "%": % caches for % layers', p_model, cardinality(p_caches), c.n_layer
            USING HINT = 'Create them with llm_kv_cache_create(model).';
        END IF;
        IF v_from < 0 OR v_from >= n THEN
          RAISE EXCEPTION 'pg_llm: model "%": logits from row % of % rows', p_model, v_from, n
            USING HINT = 'p_logits_from is a 0-based row of this call''s tokens (NULL: the last one).';
        END IF;
        x := llm_add(llm_embedding(llm_param(p_model, '{WTE}'), p_tokens, NULL, least({TILE_ROWS}, n)),
                     llm_embedding(llm_param(p_model, '{WPE}'),
                                   ARRAY(SELECT p_past + i FROM generate_series(0, n - 1) AS i), NULL,
                                   least({TILE_ROWS}, n)));
        IF p_caches IS NOT NULL AND n = 1 AND coalesce(current_setting('pg_llm.fused_decode', TRUE), '') <> 'off' THEN
          -- a decoding step: one llm_mk_gpt2_block_step call per layer (ops/block_step.py), x as a bytea row
          v_bad := (
            @bad_cache
          );
          IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'pg_llm: model "%": cache (tensor id %) is not a KV cache of > % positions x % '
              '(tile {{1,%}})', p_model, v_bad, p_past, 2 * c.n_embd, 2 * c.n_embd
              USING HINT = 'llm_kv_cache_create(model) makes the caches of a model.';
          END IF;
          v_ids := llm_gpt2_block_params(p_model, c.n_layer);
          rx := llm_tensor_get(x);
          v_row := (
            @x_row
          );
          FOR layer IN 0 .. c.n_layer - 1 LOOP
            v_out := llm_mk_gpt2_block_step(v_row, v_ids[layer * 12 + 1:layer * 12 + 12], p_caches[layer + 1], p_past,
                                            c.n_head, c.layer_norm_epsilon);
            v_row := v_out[1];
            @append;
          END LOOP;
          x := llm_tensor_create('x', rx.shape, rx.tile);
          @x_write;
        ELSE
          FOR layer IN 0 .. c.n_layer - 1 LOOP{layer}
          END LOOP;
        END IF;
        IF v_from > 0 THEN
          x := llm_embedding(x, ARRAY(SELECT generate_series(v_from, n - 1)), NULL, least({TILE_ROWS}, n - v_from));
        END IF;
        x := llm_layernorm(x, llm_param(p_model, '{LN_F.params[0]}'), llm_param(p_model, '{LN_F.params[1]}'), NULL,
                           c.layer_norm_epsilon);
        RETURN llm_matmul(x, {HEAD}, NULL, FALSE, TRUE);
    """, bad_cache=BAD_CACHE, x_row=X_ROW, append=APPEND, x_write=X_WRITE)
    return function(
        "llm_gpt2_forward_cached",
        "p_model TEXT, p_tokens INT[], p_past INT DEFAULT 0, p_caches BIGINT[] DEFAULT NULL, "
        "p_logits_from INT DEFAULT NULL", "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""
        op: GPT-2 forward of one sequence's tokens at positions p_past .. p_past+n-1 -> logits scratch tensor of
        rows p_logits_from .. n-1 (default: the last row only). With p_caches (llm_kv_cache_create) every layer
        attends to and appends to its key/value cache (llm_attention_cached); without, p_past = 0 and the
        tokens are the whole context (llm_attention). Caller releases scratch tensors.""")


def _cache() -> str:
    body = plpgsql("c llm_model_config; v_ids BIGINT[] := '{}';", """
        c := llm_model_get(p_model);
        FOR layer IN 0 .. c.n_layer - 1 LOOP
          v_ids := v_ids || llm_tensor_create('kv_cache.h.' || layer, ARRAY[c.n_ctx, 2 * c.n_embd],
                                              ARRAY[1, 2 * c.n_embd], 'cache', p_model);
        END LOOP;
        RETURN v_ids;
    """)
    return function(
        "llm_kv_cache_create", "p_model TEXT", "BIGINT[]", body,
        note="""
        Empty key/value caches of a model, one per layer (scratch tensors of role 'cache', (n_ctx, 2C), one
        tile per position): element i + 1 is layer i's. Drop them with llm_scratch_release / llm_tensor_drop.""")


def _loop() -> str:
    check = plpgsql("c llm_model_config;", """
        c := llm_model_get(p_model);
        PERFORM llm_sampling_check('llm_generate', p_temperature, p_top_k, p_top_p, p_seed);
        IF p_max_new_tokens IS NULL OR p_max_new_tokens < 0 THEN
          RAISE EXCEPTION 'pg_llm: llm_generate: max_new_tokens must be >= 0, got %',
            coalesce(p_max_new_tokens::TEXT, 'NULL') USING HINT = 'How many tokens to add after the prompt.';
        END IF;
        IF p_eos IS NULL OR p_use_cache IS NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_generate: eos and use_cache must not be NULL'
            USING HINT = 'Leave them out for the defaults (eos => true stops at <|endoftext|>, use_cache => true).';
        END IF;
        IF cardinality(p_tokens) > c.n_ctx THEN
          RAISE EXCEPTION 'pg_llm: llm_generate: the prompt has % tokens, more than the context of % of model "%"',
            cardinality(p_tokens), c.n_ctx, p_model USING HINT = 'Shorten the prompt (keep its last tokens).';
        END IF;
        RETURN llm_gpt2_check_input(p_model, p_tokens, greatest(cardinality(p_tokens), 1));
    """)
    out = [function("llm_generate_check", "p_model TEXT, p_tokens INT[], p_max_new_tokens INT, p_temperature FLOAT8, "
                    "p_top_k INT, p_top_p FLOAT8, p_seed BIGINT, p_eos BOOLEAN, p_use_cache BOOLEAN",
                    "llm_model_config", check, volatility="STABLE",
                    note="Validate every argument of a generation (nothing is written before it passes).")]
    eos = (f"SELECT v.id FROM llm_bpe_vocab AS v WHERE v.tokenizer = p_config.tokenizer AND v.special "
           f"AND v.printable = '{EOS_TEXT}'")
    out.append(function("llm_generate_eos", "p_config llm_model_config", "INT", plpgsql("", f"""
        RETURN coalesce((
          @eos
        ), {EOS_DEFAULT});
    """, eos=eos), volatility="STABLE", note=f"The end-of-text id of a config's tokenizer ({EOS_TEXT}), "
        f"{EOS_DEFAULT} when the tokenizer is not imported."))
    logits_row = ("SELECT string_agg(t.data, ''::BYTEA ORDER BY t.tr, t.tc) FROM llm_tile AS t "
                  "WHERE t.tensor_id = v_logits")
    body = plpgsql("""
        c llm_model_config; v_eos INT; v_mark BIGINT; v_step_mark BIGINT; v_caches BIGINT[]; v_seq INT[];
        v_input INT[]; v_past INT := 0; v_logits BIGINT; v_tok INT;
    """, """
        c := llm_generate_check(p_model, p_tokens, p_max_new_tokens, p_temperature, p_top_k, p_top_p, p_seed, p_eos,
                                p_use_cache);
        v_eos := llm_generate_eos(c);
        v_seq := p_tokens[:];
        v_input := v_seq;
        IF p_use_cache AND p_max_new_tokens > 0
           AND coalesce(current_setting('pg_llm.fused_decode', TRUE), '') <> 'off' THEN
          -- the whole generation in one call (ops/decode.py): no scratch tensors, the weights checked once
          PERFORM llm_model_read_lock(p_model);
          v_seq := llm_mk_gpt2_generate(llm_gpt2_param_ids(p_model), p_tokens, c.n_head, c.layer_norm_epsilon,
                                        c.n_ctx, p_max_new_tokens, p_temperature, p_top_k, p_top_p, p_seed,
                                        CASE WHEN p_eos THEN v_eos END, p_tokenizer, p_model);
          RETURN QUERY SELECT (s.i - 1)::INT, v_seq[s.i] FROM generate_subscripts(v_seq, 1) AS s(i);
          RETURN;
        END IF;
        v_mark := llm_scratch_mark();
        IF p_use_cache AND p_max_new_tokens > 0 THEN
          v_caches := llm_kv_cache_create(p_model);
        END IF;
        FOR i IN 0 .. p_max_new_tokens - 1 LOOP
          IF cardinality(v_seq) > c.n_ctx THEN
            RAISE NOTICE 'pg_llm: generation stopped after % of % new tokens: the sequence fills the context of % '
              'tokens of model "%"', i, p_max_new_tokens, c.n_ctx, p_model
              USING HINT = 'A token is predicted from at most n_ctx tokens: shorten the prompt for more.';
            EXIT;
          END IF;
          v_step_mark := llm_scratch_mark();
          IF p_use_cache THEN
            v_logits := llm_gpt2_forward_cached(p_model, v_input, v_past, v_caches);
            v_past := v_past + cardinality(v_input);
          ELSE
            v_logits := llm_gpt2_forward_cached(p_model, v_seq);
          END IF;
          v_tok := llm_mk_sample((
            @logits_row
          ), p_temperature, p_top_k, p_top_p, p_seed, i);
          PERFORM llm_scratch_release(v_step_mark);
          v_seq := v_seq || v_tok;
          v_input := ARRAY[v_tok];
          IF p_tokenizer IS NOT NULL THEN
            RAISE NOTICE 'pg_llm: step %: token % %', i, v_tok, to_json(llm_decode(ARRAY[v_tok], p_tokenizer));
          END IF;
          out_step := i;
          out_token := v_tok;
          RETURN NEXT;
          EXIT WHEN p_eos AND v_tok = v_eos;
        END LOOP;
        PERFORM llm_weight_cache_forget(v_caches);  -- the backend's mirrors of the caches (ops/weight_cache.py)
        PERFORM llm_scratch_release(v_mark);
    """, logits_row=logits_row)
    out.append(function(
        "llm_generate_steps", "p_model TEXT, p_tokens INT[], p_max_new_tokens INT, p_temperature FLOAT8, p_top_k INT, "
        "p_top_p FLOAT8, p_seed BIGINT, p_eos BOOLEAN, p_use_cache BOOLEAN, p_tokenizer TEXT DEFAULT NULL",
        "TABLE(out_step INT, out_token INT)", body, settings=KERNEL_SETTINGS,
        note="""
        The decoding loop behind llm_generate*: one row per new token (step from 0). With p_tokenizer, a NOTICE
        per token (id and text) as it is produced. Releases its scratch tensors and caches."""))
    return "\n".join(out)


ARGS = ("max_new_tokens INT DEFAULT 20, temperature FLOAT8 DEFAULT 1.0, top_k INT DEFAULT 0, "
        "top_p FLOAT8 DEFAULT 1.0, seed BIGINT DEFAULT 0, eos BOOLEAN DEFAULT FALSE, use_cache BOOLEAN DEFAULT TRUE")
PASS = "max_new_tokens, temperature, top_k, top_p, seed, eos, use_cache"


def _api() -> str:
    out = [function("llm_generate_tokens", f"model TEXT, tokens INT[], {ARGS}", "INT[]", sql(f"""
        SELECT tokens || ARRAY(SELECT s.out_token FROM llm_generate_steps(model, tokens, {PASS}) AS s
                               ORDER BY s.out_step)""") + ";", language="sql", settings=KERNEL_SETTINGS,
                    note="""
        Continue a sequence of token ids: returns prompt + new tokens (like transformers' generate). temperature
        0 is greedy; top_k 0 and top_p 1 disable those filters; seed makes sampling reproducible; eos stops at
        <|endoftext|>; use_cache false recomputes every step (same tokens, slower). See api/generate.sql.""")]
    encode = """
        c := llm_model_get(model);
        IF prompt IS NULL OR prompt = '' THEN
          RAISE EXCEPTION 'pg_llm: llm_generate: empty prompt' USING HINT = 'Give at least one token of text.';
        END IF;
        v_tokens := llm_encode(prompt, c.tokenizer);"""
    new = f"SELECT s.out_token FROM llm_generate_steps(model, v_tokens, {PASS}) AS s ORDER BY s.out_step"
    out.append(function("llm_generate", f"model TEXT, prompt TEXT, {ARGS}", "TEXT",
                        plpgsql("c llm_model_config; v_tokens INT[];", encode + """
        RETURN llm_decode(ARRAY(
          @new
        ), c.tokenizer);
    """, new=new), settings=KERNEL_SETTINGS, note="""
        Continue a text: the prompt is encoded with the model's tokenizer (llm_encode), the new tokens only are
        decoded (llm_decode) and returned. Arguments as llm_generate_tokens."""))
    stream = (f"SELECT s.out_step, s.out_token, llm_decode(ARRAY[s.out_token], c.tokenizer) "
              f"FROM llm_generate_steps(model, v_tokens, {PASS}, c.tokenizer) AS s ORDER BY s.out_step")
    out.append(function("llm_generate_stream", f"model TEXT, prompt TEXT, {ARGS}",
                        "TABLE(step INT, token_id INT, token TEXT)",
                        plpgsql("c llm_model_config; v_tokens INT[];", encode + """
        RETURN QUERY
        @stream;
    """, stream=stream), settings=KERNEL_SETTINGS, note="""
        llm_generate one row per new token (step from 0, id, its text), with a NOTICE per token while it runs
        so psql shows progress. A token's own text can be part of a UTF-8 character (shown as U+FFFD)."""))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _sampling(), _cache(), _forward(), _loop(), _api()])
