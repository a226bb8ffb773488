"""Perplexity of a model on a text, a token sequence or a dataset split, with sliding windows.

llm_perplexity_tokens(model, tokens, stride) follows the Hugging Face perplexity guide (fixed-length models):
    for begin in range(0, L, stride):                  # stride defaults to n_ctx (no overlap)
        end = min(begin + n_ctx, L); trg_len = end - prev_end
        score the last trg_len tokens of tokens[begin:end], each given the window's tokens before it
        prev_end = end; stop when end == L
so every scored token gets the most context its window allows. A token is scored only with context: the
first token of the sequence never is, and with stride = n_ctx neither is the first token of each window
(exactly as in the guide). Unlike the guide, which weights each window's mean loss by trg_len - 1 (an
off-by-one when windows overlap), the result is exact: mean_loss = (sum of the per-token NLLs in float64) /
tokens_scored, perplexity = exp(mean_loss). Each window's logits are computed only for its scored rows
(llm_gpt2_forward_cached with p_logits_from), and the NLLs come from llm_nll.

llm_perplexity(model, text, stride) encodes the text with the model's tokenizer (llm_encode) first.
llm_perplexity(model, dataset => name, split => 'val', stride) scores a split of llm_dataset: its rows
(tokens, targets shifted by one, pos = start of the window in its source's split stream, possibly
overlapping) are put back into the token stream of each source (contiguous stretches of it when windows
leave gaps), and each stream is scored exactly like llm_perplexity_tokens; all are pooled into one exact mean.
So stride means the same thing for a text and a dataset, and a token in two overlapping rows counts once.
`dataset` has the domain type llm_dataset_name so that a positional call llm_perplexity(model, 'some text')
is unambiguous (an untyped literal prefers the text form).
"""
from __future__ import annotations

from pg_llm.api.gpt2 import first_bad_id
from pg_llm.gen.emit import comment, function, plpgsql
from pg_llm.gen.sqlfmt import raw_ddl
from pg_llm.ops.common import KERNEL_SETTINGS
from pg_llm.ops.score import FUSED

SQL_FILE = "api/perplexity.sql"
ORDER = 82

OUT = "OUT perplexity FLOAT8, OUT tokens_scored BIGINT, OUT mean_loss FLOAT8"
STRIDE = """
        v_stride := coalesce(stride, c.n_ctx);
        IF v_stride < 1 OR v_stride > c.n_ctx THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: stride must be in [1, %] (the context of model "%"), got %',
            c.n_ctx, model, v_stride USING HINT = 'A smaller stride gives each token more context and costs more.';
        END IF;"""


def _windows() -> str:
    plan = plpgsql("v_b INT := 0; v_e INT; v_prev INT := 0;", """
        WHILE v_b < p_n LOOP
          v_e := least(v_b + p_window, p_n);
          IF greatest(v_prev, v_b) < v_e THEN
            b := v_b;
            e := v_e;
            s := greatest(v_prev, v_b);
            RETURN NEXT;
          END IF;
          v_prev := v_e;
          EXIT WHEN v_e = p_n;
          v_b := v_b + p_stride;
        END LOOP;
    """)
    out = [function(
        "llm_perplexity_plan", "p_n INT, p_window INT, p_stride INT", "TABLE(b INT, e INT, s INT)",
        plan, volatility="IMMUTABLE", note="""
        The sliding windows of a sequence of p_n positions (0-based, half-open): [b, e) with b = 0, stride, ...
        and e = min(b + p_window, n), scoring positions [s, e), s = max(previous e, b); windows that score nothing
        are left out.""")]
    body = plpgsql("""
        c llm_model_config; v_mark BIGINT; v_logits BIGINT; v_sum FLOAT8 := 0; v_count BIGINT := 0;
        v_nll FLOAT8[]; w RECORD; v_wb INT[] := '{}'; v_we INT[] := '{}'; v_ws INT[] := '{}'; v_fused BOOLEAN;
    """, f"""
        c := llm_model_get(p_model);
        v_fused := {FUSED};
        FOR w IN SELECT * FROM llm_perplexity_plan(cardinality(p_x), p_window, p_stride) LOOP
          v_count := v_count + (w.e - w.s);
          IF v_fused THEN
            v_wb := v_wb || w.b;
            v_we := v_we || w.e;
            v_ws := v_ws || w.s;
            CONTINUE;
          END IF;
          v_mark := llm_scratch_mark();
          v_logits := llm_gpt2_forward_cached(p_model, p_x[w.b + 1:w.e], 0, NULL, w.s - w.b);
          v_nll := llm_nll(v_logits, p_y[w.s + 1:w.e]);  -- not inside a query: the planner would run it early
          v_sum := v_sum + (
            @nll
          );
          PERFORM llm_scratch_release(v_mark);
        END LOOP;
        IF cardinality(v_wb) > 0 THEN  -- every window in one fused call (ops/score.py)
          PERFORM llm_model_read_lock(p_model);
          v_nll := llm_mk_gpt2_window_nll(llm_gpt2_param_ids(p_model), p_x, p_y, v_wb, v_we, v_ws, c.n_head,
                                          c.layer_norm_epsilon);
          v_sum := (
            @nll
          );
        END IF;
        RETURN ARRAY[v_sum, v_count];
    """, nll="SELECT sum(u.v) FROM unnest(v_nll) AS u(v)")
    out.append(function(
        "llm_perplexity_windows", "p_model TEXT, p_x INT[], p_y INT[], p_window INT, p_stride INT", "FLOAT8[]",
        body, settings=KERNEL_SETTINGS,
        note="""
        Sliding-window NLL: windows x[b:e) of llm_perplexity_plan; window scores y[i] for i in [s, e) given
        x[b..i]. Returns {sum of NLLs (float64), tokens scored}."""))
    return "\n".join(out)


def _tokens() -> str:
    body = plpgsql("c llm_model_config; v_tokens INT[] := tokens[:]; n INT; v_stride INT; v_bad BIGINT; v FLOAT8[];",
                   """
        c := llm_model_get(model);
        n := coalesce(cardinality(v_tokens), 0);
        IF n < 2 THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: % tokens: need at least 2 (the first token is never scored)', n
            USING HINT = 'Perplexity scores each token given the ones before it.';
        END IF;
        v_bad := (
          @bad
        );
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: token id % at position % is outside the vocabulary [0, %) of '
            'model "%"', coalesce(v_tokens[v_bad]::TEXT, 'NULL'), v_bad, c.vocab_size, model
            USING HINT = 'Positions count from 1; ids come from llm_encode with the model''s tokenizer.';
        END IF;""" + STRIDE + """
        -- a window of n_ctx tokens predicts its last n_ctx - 1 tokens from its first n_ctx - 1
        v := llm_perplexity_windows(model, v_tokens[1:n - 1], v_tokens[2:n], c.n_ctx - 1, v_stride);
        tokens_scored := v[2];
        IF tokens_scored = 0 THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: no token was scored' USING HINT = 'Use a smaller stride.';
        END IF;
        mean_loss := v[1] / v[2];
        perplexity := exp(mean_loss);
    """, bad=first_bad_id("v_tokens"))
    return function(
        "llm_perplexity_tokens", f"model TEXT, tokens INT[], stride INT DEFAULT NULL, {OUT}", "RECORD", body,
        settings=KERNEL_SETTINGS,
        note="""
        Perplexity of a token sequence, sliding windows of n_ctx tokens moved by stride (default n_ctx) as in the
        Hugging Face guide, counted exactly: (perplexity, tokens_scored, mean_loss = NLL sum / tokens_scored).""")


def _text() -> str:
    body = plpgsql("c llm_model_config;", """
        c := llm_model_get(model);
        IF $2 IS NULL OR $2 = '' THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: empty text' USING HINT = 'Give at least two tokens of text.';
        END IF;
        SELECT q.perplexity, q.tokens_scored, q.mean_loss INTO perplexity, tokens_scored, mean_loss
        FROM llm_perplexity_tokens(model, llm_encode($2, c.tokenizer), stride) AS q;
    """)
    return function(
        "llm_perplexity", f"model TEXT, text TEXT, stride INT DEFAULT NULL, {OUT}", "RECORD", body,
        settings=KERNEL_SETTINGS,
        note="Perplexity of a text, encoded with the model's tokenizer: llm_perplexity_tokens(model, "
             "llm_encode(text), stride).")


def _dataset() -> str:
    rows = "FROM llm_dataset AS d WHERE d.dataset = $2 AND d.split = $3"
    check = f"""
        SELECT count(*) AS n_rows,
               min(d.id) FILTER (WHERE d.tokens[2:cardinality(d.tokens)]
                                 IS DISTINCT FROM d.targets[1:cardinality(d.targets) - 1]) AS bad_shift,
               min(d.id) FILTER (WHERE EXISTS (SELECT 1 FROM unnest(d.tokens || d.targets) AS u(id)
                                               WHERE u.id IS NULL OR u.id < 0 OR u.id >= c.vocab_size)) AS bad_id
        {rows}"""
    # token p of a source's split stream is tokens[p - pos] of every row covering it (the last target included)
    stream = """
        SELECT d.source_hash, d.pos + u.o - 1 AS p, min(u.id) AS id, max(u.id) AS hi
        FROM llm_dataset AS d
        CROSS JOIN LATERAL unnest(d.tokens || d.targets[cardinality(d.targets)]) WITH ORDINALITY AS u(id, o)
        WHERE d.dataset = $2 AND d.split = $3
        GROUP BY d.source_hash, d.pos + u.o - 1"""
    overlap = f"SELECT min(t.source_hash || ' at ' || t.p) FROM ({stream}) AS t WHERE t.id <> t.hi"
    segments = f"""
        SELECT array_agg(s.id ORDER BY s.p) AS ids
        FROM (
          SELECT t.source_hash, t.p, t.id, t.p - row_number() OVER (PARTITION BY t.source_hash ORDER BY t.p) AS seg
          FROM ({stream}) AS t
        ) AS s
        GROUP BY s.source_hash, s.seg
        ORDER BY s.source_hash, s.seg"""
    known = "SELECT string_agg(DISTINCT d.dataset || '/' || d.split, ', ') FROM llm_dataset AS d"
    body = plpgsql("""
        c llm_model_config; v_stride INT; v_rows BIGINT; v_bad_shift BIGINT; v_bad_id BIGINT; v_bad TEXT;
        v_known TEXT; r RECORD; n INT; v FLOAT8[]; v_sum FLOAT8 := 0; v_count BIGINT := 0;
    """, """
        c := llm_model_get(model);""" + STRIDE + """
        SELECT q.n_rows, q.bad_shift, q.bad_id INTO v_rows, v_bad_shift, v_bad_id FROM (
          @check
        ) AS q;
        IF v_rows = 0 THEN
          v_known := (
            @known
          );
          RAISE EXCEPTION 'pg_llm: llm_perplexity: dataset "%" has no split "%"', $2, $3
            USING HINT = format('Known dataset/split pairs: %s (SELECT * FROM llm_datasets).',
                                coalesce(v_known, '(none)'));
        END IF;
        IF v_bad_shift IS NOT NULL OR v_bad_id IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: dataset "%" split "%": row id % %', $2, $3,
            coalesce(v_bad_shift, v_bad_id), CASE WHEN v_bad_shift IS NOT NULL
              THEN 'is not a window of a token stream (targets must be tokens shifted by one)'
              ELSE 'has ids outside the vocabulary [0, ' || c.vocab_size || ') of model "' || model || '"' END
            USING HINT = 'Load the corpus with the model''s tokenizer (pg-llm corpus load --replace).';
        END IF;
        v_bad := (
          @overlap
        );
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: dataset "%" split "%": overlapping rows disagree on the token '
            'of source %', $2, $3, v_bad USING HINT = 'Rows of one source are windows of one stream (pos = start).';
        END IF;
        FOR r IN
          @segments
        LOOP
          n := cardinality(r.ids);
          v := llm_perplexity_windows(model, r.ids[1:n - 1], r.ids[2:n], c.n_ctx - 1, v_stride);
          v_sum := v_sum + v[1];
          v_count := v_count + v[2]::BIGINT;
        END LOOP;
        IF v_count = 0 THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity: no token was scored' USING HINT = 'Use a smaller stride.';
        END IF;
        tokens_scored := v_count;
        mean_loss := v_sum / v_count;
        perplexity := exp(mean_loss);
    """, check=check, known=known, overlap=overlap, segments=segments)
    return function(
        "llm_perplexity", "model TEXT, dataset llm_dataset_name, split TEXT DEFAULT 'val', stride INT DEFAULT NULL, "
        f"{OUT}", "RECORD", body, settings=KERNEL_SETTINGS,
        note="""
        Perplexity of a dataset split: its rows (windows of a token stream, pos = start) are put back into each
        source's stream, which is scored like llm_perplexity_tokens (sliding windows, stride), pooled exactly.""")


# How llm_perplexity_texts gets a text's token ids (v_t), skipping NULL and empty texts; texts_body() takes
# another (api/cluster_infer.py: token ids the coordinator encoded, as int[] literals).
ENCODE = """
          CONTINUE WHEN texts[i] IS NULL OR texts[i] = '';
          v_t := llm_encode(texts[i], c.tokenizer);"""


def texts_body(encode: str = ENCODE) -> str:
    """The body of llm_perplexity_texts (model, texts, stride): `encode` sets v_t from texts[i]."""
    return plpgsql("""
        c llm_model_config; v_stride INT; v_t INT[]; n INT; v_off INT; w RECORD; v FLOAT8[]; v_nll FLOAT8[];
        v_x INT[] := '{}'; v_y INT[] := '{}'; v_wb INT[] := '{}'; v_we INT[] := '{}'; v_ws INT[] := '{}';
        v_doc INT[] := '{}'; v_sum FLOAT8[]; v_count BIGINT[]; v_top INT; v_fused BOOLEAN;
    """, """
        c := llm_model_get(model);""" + STRIDE + f"""
        v_fused := {FUSED};
        IF texts IS NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_perplexity_texts: texts is NULL'
            USING HINT = 'Pass an array of texts, e.g. ARRAY(SELECT body FROM docs ORDER BY id).';
        END IF;
        v_sum := array_fill(0::FLOAT8, ARRAY[cardinality(texts)]);
        v_count := array_fill(0::BIGINT, ARRAY[cardinality(texts)]);
        FOR i IN 1 .. cardinality(texts) LOOP""" + encode + """
          n := cardinality(v_t);
          CONTINUE WHEN n < 2;
          v_top := (SELECT max(u.id) FROM unnest(v_t) AS u(id));
          IF v_top >= c.vocab_size THEN
            RAISE EXCEPTION 'pg_llm: llm_perplexity_texts: text % encodes to token id %, outside the vocabulary '
              '[0, %) of model "%"', i, v_top, c.vocab_size, model
              USING HINT = 'The model''s config names its tokenizer: its vocabulary must fit vocab_size.';
          END IF;
          IF NOT v_fused THEN  -- the reference: each text on its own through the kernel chain
            v := llm_perplexity_windows(model, v_t[1:n - 1], v_t[2:n], c.n_ctx - 1, v_stride);
            v_sum[i] := v[1];
            v_count[i] := v[2]::BIGINT;
            CONTINUE;
          END IF;
          v_off := cardinality(v_x);
          v_x := v_x || v_t[1:n - 1];
          v_y := v_y || v_t[2:n];
          FOR w IN SELECT * FROM llm_perplexity_plan(n - 1, c.n_ctx - 1, v_stride) LOOP
            v_wb := v_wb || (v_off + w.b);
            v_we := v_we || (v_off + w.e);
            v_ws := v_ws || (v_off + w.s);
            v_doc := v_doc || i;
            v_count[i] := v_count[i] + (w.e - w.s);
          END LOOP;
        END LOOP;
        IF cardinality(v_wb) > 0 THEN  -- every window of every text packed into fused forwards (ops/score.py)
          PERFORM llm_model_read_lock(model);
          v_nll := llm_mk_gpt2_window_nll(llm_gpt2_param_ids(model), v_x, v_y, v_wb, v_we, v_ws, c.n_head,
                                          c.layer_norm_epsilon);
          FOR k IN 1 .. cardinality(v_nll) LOOP
            v_sum[v_doc[k]] := v_sum[v_doc[k]] + v_nll[k];
          END LOOP;
        END IF;
        RETURN QUERY
          SELECT i.i, CASE WHEN v_count[i.i] > 0 THEN exp(v_sum[i.i] / v_count[i.i]) END, v_count[i.i],
                 CASE WHEN v_count[i.i] > 0 THEN v_sum[i.i] / v_count[i.i] END
          FROM generate_subscripts(texts, 1) AS i(i) ORDER BY i.i;
    """)


def _texts() -> str:
    return function(
        "llm_perplexity_texts", "model TEXT, texts TEXT[], stride INT DEFAULT NULL",
        "TABLE(ord INT, perplexity FLOAT8, tokens_scored BIGINT, mean_loss FLOAT8)", texts_body(),
        settings=KERNEL_SETTINGS,
        note="""
        Perplexity of many texts at once (a table's rows: texts => ARRAY(SELECT body FROM docs ORDER BY id)): one
        row per text, ord = its index in the array; each exactly as llm_perplexity(model, text, stride), but all
        their windows are packed into a few forwards. A text of fewer than 2 tokens (or NULL) scores nothing:
        tokens_scored 0, perplexity and mean_loss NULL.""")


def emit() -> str:
    domain = (comment("A dataset name: a distinct type so llm_perplexity(model, 'text') picks the text form.") + "\n"
              + raw_ddl("CREATE DOMAIN llm_dataset_name AS TEXT") + ";\n")
    return "\n".join([comment(__doc__ or ""), domain, _windows(), _tokens(), _text(), _dataset(), _texts()])
