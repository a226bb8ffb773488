"""GPT-2 forward pass as a chain of tile kernels, and the inference API on top of it.

    x = wte[tokens] + wpe[positions]                       (embedding, add)
    for each block h.i:                                    (pre-LayerNorm transformer block)
        x = x + attn.c_proj(attention(attn.c_attn(ln_1(x))))
        x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
    logits = ln_f(x) @ wte^T                               (tied output projection)

Activations are scratch tensors (UNLOGGED partition); every API call releases the ones it made.
A batch is B sequences of T tokens flattened to B*T rows; positions restart at 0 for each sequence.
"""
from __future__ import annotations

import textwrap

from pg_llm.config import BLOCK, LN_F, UNTIED_HEAD, WPE, WTE
from pg_llm.gen.emit import comment, function, plpgsql
from pg_llm.ops.common import KERNEL_SETTINGS
from pg_llm.ops.gpt2_block import FUSED_TRAIN
from pg_llm.ops.score import FUSED

SQL_FILE = "api/gpt2.sql"
ORDER = 80

TILE_ROWS = 256  # activation row tile (rows of B*T); columns follow the weights' tiling


def first_bad_id(ids: str) -> str:
    """The query of the first (1-based) position of array `ids` holding NULL or an id outside [0, c.vocab_size)."""
    return (f"SELECT u.k FROM unnest({ids}) WITH ORDINALITY AS u(t, k) WHERE u.t IS NULL OR u.t < 0 "
            "OR u.t >= c.vocab_size ORDER BY u.k LIMIT 1")


def _checks() -> str:
    body = plpgsql("c llm_model_config; v_bad INT;", """
        c := llm_model_get(p_model);
        IF p_tokens IS NULL OR cardinality(p_tokens) = 0 THEN
          RAISE EXCEPTION 'pg_llm: model "%": empty input: need at least one token id', p_model
            USING HINT = 'Token ids come from llm_encode(text).';
        END IF;
        IF array_ndims(p_tokens) > 1 THEN
          RAISE EXCEPTION 'pg_llm: model "%": token ids must be a one-dimensional int[], got % dimensions %',
            p_model, array_ndims(p_tokens), array_dims(p_tokens)
            USING HINT = 'Pass one sequence (or B sequences flattened, with seq_len => T where it applies).';
        END IF;
        IF p_seq_len < 1 OR cardinality(p_tokens) % p_seq_len <> 0 THEN
          RAISE EXCEPTION 'pg_llm: model "%": % tokens are not a whole number of sequences of %', p_model,
            cardinality(p_tokens), p_seq_len
            USING HINT = 'A batch is B sequences of seq_len tokens, flattened: cardinality(tokens) = B * seq_len.';
        END IF;
        IF p_seq_len > c.n_ctx THEN
          RAISE EXCEPTION 'pg_llm: model "%": % tokens in a sequence, more than its context of %', p_model,
            p_seq_len, c.n_ctx USING HINT = 'Shorten the input or evaluate it with llm_perplexity (sliding window).';
        END IF;
        v_bad := (
          @bad
        );
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: model "%": token id % at position % is outside the vocabulary [0, %)', p_model,
            coalesce(p_tokens[v_bad]::TEXT, 'NULL'), v_bad, c.vocab_size
            USING HINT = 'Positions count from 1; ids come from llm_encode with the model''s tokenizer.';
        END IF;
        RETURN c;
    """, bad=first_bad_id("p_tokens"))
    return function("llm_gpt2_check_input", "p_model TEXT, p_tokens INT[], p_seq_len INT", "llm_model_config",
                    body, volatility="STABLE",
                    note="Validate a model's input: known model, non-empty, within the context, ids in range.")


# The output projection: tied to wte, or an untied config's lm_head (both forwards; logits = x @ head^T).
HEAD = f"llm_param(p_model, CASE WHEN c.tied_embeddings THEN '{WTE}' ELSE '{UNTIED_HEAD[0]}' END)"


def _layer() -> str:
    """config.BLOCK for layer `pre` as PL/pgSQL: each op recorded on the tape when p_tape is set; dropout on the
    attention probabilities and the residual branches, each site with its own seed."""
    out = []
    for s in BLOCK:
        if s.op == "layernorm":
            w, b = s.params
            out.append(f"h := llm_t_layernorm(p_tape, x, llm_param(p_model, pre || '{w}'),\n"
                       f"                     llm_param(p_model, pre || '{b}'), c.layer_norm_epsilon);")
        elif s.op == "attention":
            out.append("h := llm_t_attention(p_tape, h, c.n_head, t, p_dropout, llm_site_seed(p_seed, pre || 'attn'));")
        elif s.residual:
            site = s.name.split(".")[0] + ".resid"
            out.append(f"x := llm_t_linear(p_tape, h, p_model, pre || '{s.name}', p_residual => x, "
                       f"p_dropout => p_dropout,\n"
                       f"                  p_seed => llm_site_seed(p_seed, pre || '{site}'));")
        else:
            out.append(f"h := llm_t_linear(p_tape, h, p_model, pre || '{s.name}'{', TRUE' if s.gelu else ''});")
    return textwrap.indent("\n".join(out), " " * 10)


# A training forward's block as one op (ops/gpt2_block.py): the block's 12 ids, its 3 dropout sites' seeds, and
# the tiling of the chain's residual dropout masks (x's tile rows, mlp.c_proj.weight's tile columns).
FUSED_LAYER = f"""
x := llm_t_gpt2_block(p_tape, x, v_block[layer * 12 + 1:layer * 12 + 12], c.n_head, t, c.layer_norm_epsilon,
                      p_dropout, ARRAY[llm_site_seed(p_seed, pre || 'attn'), llm_site_seed(p_seed, pre || 'attn.resid'),
                                       llm_site_seed(p_seed, pre || 'mlp.resid')],
                      ARRAY[{TILE_ROWS}, (SELECT least(v.tile[2], llm_cols(v.shape)) FROM llm_tensor AS v
                                          WHERE v.id = v_block[layer * 12 + 11]), p_row0]);"""


def _forward() -> str:
    body = plpgsql("""
        c llm_model_config;
        n INT := cardinality(p_tokens);
        t INT := coalesce(p_seq_len, cardinality(p_tokens));
        x BIGINT; h BIGINT; pre TEXT; v_block BIGINT[];
    """, f"""
        c := llm_gpt2_check_input(p_model, p_tokens, t);
        PERFORM llm_model_read_lock(p_model);
        PERFORM llm_tables_analyze();  -- a fresh database has no statistics yet: see llm_tables_analyze
        IF p_tape IS NOT NULL AND {FUSED_TRAIN} THEN  -- one op for the input (ops/gpt2_embed.py)
          x := llm_t_gpt2_embed(p_tape, llm_param(p_model, '{WTE}'), llm_param(p_model, '{WPE}'), p_tokens, t,
                                p_dropout, llm_site_seed(p_seed, 'embd'), p_row0, {TILE_ROWS});
          v_block := llm_gpt2_block_params(p_model, c.n_layer);  -- ops/gpt2_block.py: only each block's input kept
        ELSE
          IF p_row0 <> 0 AND p_dropout > 0 THEN
            RAISE EXCEPTION 'pg_llm: llm_gpt2_forward: dropout on rows from % of a batch needs the fused training '
              'forward', p_row0 USING HINT = 'Leave pg_llm.fused_train on (the per-op chain draws masks per tile of '
              'its own rows).';
          END IF;
          x := llm_t_add(p_tape,
                         llm_t_embedding(p_tape, llm_param(p_model, '{WTE}'), p_tokens, least({TILE_ROWS}, n)),
                         llm_t_embedding(p_tape, llm_param(p_model, '{WPE}'),
                                         ARRAY(SELECT (i - 1) % t FROM generate_series(1, n) AS i),
                                         least({TILE_ROWS}, n)));
          x := llm_t_dropout(p_tape, x, p_dropout, llm_site_seed(p_seed, 'embd'));
        END IF;
        FOR layer IN 0 .. c.n_layer - 1 LOOP
          pre := 'h.' || layer || '.';
          IF v_block IS NOT NULL THEN
{textwrap.indent(FUSED_LAYER.strip(), " " * 12)}
            CONTINUE;
          END IF;
{_layer()}
        END LOOP;
        IF p_hidden THEN  -- the caller applies ln_f and the head (training: llm_head_nll)
          RETURN x;
        END IF;
        x := llm_t_layernorm(p_tape, x, llm_param(p_model, '{LN_F.params[0]}'), llm_param(p_model, '{LN_F.params[1]}'),
                             c.layer_norm_epsilon);
        IF p_rows IS NOT NULL THEN  -- only these rows' logits: gather them before the (costly) tied projection
          x := llm_t_embedding(p_tape, x, p_rows, least({TILE_ROWS}, cardinality(p_rows)));
        END IF;
        RETURN llm_t_matmul(p_tape, x, {HEAD}, FALSE, TRUE);
    """)
    return function("llm_gpt2_forward",
                    "p_model TEXT, p_tokens INT[], p_seq_len INT DEFAULT NULL, p_tape BIGINT DEFAULT NULL, "
                    "p_dropout FLOAT8 DEFAULT 0, p_seed BIGINT DEFAULT 0, p_rows INT[] DEFAULT NULL, "
                    "p_hidden BOOLEAN DEFAULT FALSE, p_row0 INT DEFAULT 0", "BIGINT",
                    body, settings=KERNEL_SETTINGS,
                    note="""op: GPT-2 forward. tokens (B*T ids, sequences of p_seq_len = T, default all one
                    sequence) -> logits scratch tensor (B*T, vocab), or (cardinality(p_rows), vocab) for only the
                    rows p_rows (0-based, e.g. the last position: the projection on wte is skipped for the
                    others). With p_tape every op is recorded for
                    backward; p_dropout > 0 applies dropout (embeddings, attention probabilities, residual
                    branches) with masks seeded from p_seed; with a tape each block is one gpt2_block op
                    (pg_llm.fused_train = off: the per-op chain). p_hidden: return the last block's output (B*T,
                    C), before ln_f, instead of the logits. p_row0: the tokens are rows from p_row0 (whole
                    sequences) of a larger batch, whose dropout masks they get (a data-parallel rank's share).
                    Caller releases scratch tensors.""")


def _api() -> str:
    out = []
    body = plpgsql("c llm_model_config; v_mark BIGINT; v_logits BIGINT; v_out FLOAT4[];", f"""
        IF {FUSED} THEN  -- one call on the cached weights (ops/score.py)
          c := llm_gpt2_check_input(model, tokens, greatest(cardinality(tokens), 1));
          PERFORM llm_model_read_lock(model);
          RETURN llm_tile_to_float4(llm_mk_gpt2_logits(llm_gpt2_param_ids(model), tokens, cardinality(tokens) - 1,
                                                       c.n_head, c.layer_norm_epsilon));
        END IF;
        v_mark := llm_scratch_mark();
        v_logits := llm_gpt2_forward(model, tokens, p_rows => ARRAY[cardinality(tokens) - 1]);
        v_out := (SELECT r.vals FROM llm_tensor_rows(v_logits, 0, 1) AS r);
        PERFORM llm_scratch_release(v_mark);
        RETURN v_out;
    """)
    out.append(function("llm_logits", "model TEXT, tokens INT[]", "FLOAT4[]", body, settings=KERNEL_SETTINGS,
                        note="Logits of the last position (vocab floats) for one sequence of token ids."))
    body = plpgsql("c llm_model_config; v_mark BIGINT; v_logits BIGINT; v_all BYTEA;", f"""
        IF {FUSED} THEN
          c := llm_gpt2_check_input(model, tokens, greatest(cardinality(tokens), 1));
          PERFORM llm_model_read_lock(model);
          v_all := llm_mk_gpt2_logits(llm_gpt2_param_ids(model), tokens, 0, c.n_head, c.layer_norm_epsilon);
          RETURN QUERY SELECT i.i, llm_tile_to_float4(substring(v_all FROM i.i * c.vocab_size * 4 + 1
                                                                FOR c.vocab_size * 4))
                       FROM generate_series(0, cardinality(tokens) - 1) AS i(i);
          RETURN;
        END IF;
        v_mark := llm_scratch_mark();
        v_logits := llm_gpt2_forward(model, tokens);
        RETURN QUERY SELECT r.row_index, r.vals FROM llm_tensor_rows(v_logits) AS r;
        PERFORM llm_scratch_release(v_mark);
    """)
    out.append(function("llm_logits_all", "model TEXT, tokens INT[]", "TABLE(pos INT, logits FLOAT4[])", body,
                        settings=KERNEL_SETTINGS, note="Logits of every position of one sequence of token ids."))
    body = plpgsql("c llm_model_config; n INT; v_bad INT; v_starts INT[]; v_nll FLOAT8[]; v_mark BIGINT; "
                   "v_logits BIGINT; v_loss FLOAT8;", f"""
        IF cardinality(targets) IS DISTINCT FROM cardinality(tokens) THEN
          RAISE EXCEPTION 'pg_llm: llm_loss: % tokens but % targets', cardinality(tokens), cardinality(targets)
            USING HINT = 'targets[i] is the id that should follow tokens[i]: same length.';
        END IF;
        IF training THEN
          RAISE EXCEPTION 'pg_llm: llm_loss(training => true) needs the training extension (dropout)'
            USING HINT = 'Use training => false for evaluation.';
        END IF;
        IF {FUSED} THEN  -- sequences of seq_len as windows scoring every row (ops/score.py)
          c := llm_gpt2_check_input(model, tokens, coalesce(seq_len, cardinality(tokens)));
          n := coalesce(seq_len, cardinality(tokens));
          v_bad := (
            @bad
          );
          IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'pg_llm: llm_loss: target % at position % is outside the vocabulary [0, %) of model "%"',
              coalesce(targets[v_bad]::TEXT, 'NULL'), v_bad, c.vocab_size, model
              USING HINT = 'targets[i] is the token id that should follow tokens[i] (positions count from 1).';
          END IF;
          PERFORM llm_model_read_lock(model);
          v_starts := ARRAY(SELECT generate_series(0, cardinality(tokens) - 1, n));  -- each window scores all rows
          v_nll := llm_mk_gpt2_window_nll(llm_gpt2_param_ids(model), tokens, targets, v_starts,
                                          ARRAY(SELECT generate_series(n, cardinality(tokens), n)), v_starts,
                                          c.n_head, c.layer_norm_epsilon);
          RETURN (SELECT sum(u.v) FROM unnest(v_nll) AS u(v)) / cardinality(tokens);
        END IF;
        v_mark := llm_scratch_mark();
        v_logits := llm_gpt2_forward(model, tokens, seq_len);
        v_loss := llm_cross_entropy(v_logits, targets);
        PERFORM llm_scratch_release(v_mark);
        RETURN v_loss;
    """, bad=first_bad_id("targets"))
    out.append(function("llm_loss", "model TEXT, tokens INT[], targets INT[], training BOOLEAN DEFAULT FALSE, "
                        "seq_len INT DEFAULT NULL", "FLOAT8", body, settings=KERNEL_SETTINGS,
                        note="Mean negative log-likelihood per token of targets given tokens (B*T of them, "
                             "sequences of seq_len)."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _checks(), _forward(), _api()])
