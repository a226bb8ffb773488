"""Models: a named GPT-2 configuration (llm_model_config) and models bound to one (llm_model).

A model's parameters are the durable tensors llm_tensor(model = <name>, role = 'param'), named like Hugging
Face GPT-2 without the "transformer." prefix (wte.weight, h.0.attn.c_attn.weight, ...). Linear weights keep
the Conv1D orientation [in, out] so a layer is x @ W + b; the LM head is tied to wte.weight and not stored.
llm_param_names(config) lists exactly the tensors a config needs (generated from pg_llm.config, the same
table the Python loader and the numpy reference use).
"""
from __future__ import annotations

from pg_llm.config import DEFAULT_CONFIG, EMBEDDINGS, FINAL, LAYER, STANDARD, UNTIED_HEAD, Shape
from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import OWNER

SQL_FILE = "api/model.sql"
ORDER = 76

SIZES = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1.5B"}
KNOWN_CONFIGS = "SELECT coalesce(string_agg(k.name, ', ' ORDER BY k.name), '(none)') FROM llm_model_config AS k"
KNOWN_MODELS = "SELECT coalesce(string_agg(k.name, ', ' ORDER BY k.name), '(none)') FROM llm_model AS k"


def _tables() -> str:
    out = [stmt(f"""
        CREATE TABLE llm_model_config (
          name TEXT PRIMARY KEY CHECK (name <> ''),
          n_layer INT NOT NULL CHECK (n_layer > 0),
          n_head INT NOT NULL CHECK (n_head > 0),
          n_embd INT NOT NULL CHECK (n_embd > 0),
          n_ctx INT NOT NULL CHECK (n_ctx > 0),
          vocab_size INT NOT NULL CHECK (vocab_size > 0),
          tokenizer TEXT NOT NULL DEFAULT 'gpt2',
          tied_embeddings BOOLEAN NOT NULL DEFAULT TRUE,
          layer_norm_epsilon DOUBLE PRECISION NOT NULL DEFAULT 1e-5 CHECK (layer_norm_epsilon > 0),
          activation TEXT NOT NULL DEFAULT 'gelu_new' CHECK (activation IN ('gelu_new')),
          dropout DOUBLE PRECISION NOT NULL DEFAULT 0.1 CHECK (dropout >= 0 AND dropout < 1),
          initializer_range DOUBLE PRECISION NOT NULL DEFAULT 0.02 CHECK (initializer_range > 0),
          note TEXT,
          {OWNER},
          CHECK (n_embd % n_head = 0)
        )""", "GPT-2 hyperparameters by name. n_ctx is the context length (HF n_positions); dropout is the "
              "residual/embedding/attention dropout used when training.")]
    cols = "name, n_layer, n_head, n_embd, n_ctx, vocab_size, tokenizer, tied_embeddings, layer_norm_epsilon, " \
           "activation, dropout, initializer_range, note"
    rows = []
    for name, c in STANDARD.items():
        note = f"OpenAI GPT-2 {SIZES[name]}" + (" (the default config)" if name == DEFAULT_CONFIG else "")
        rows.append(f"('{name}', {c.n_layer}, {c.n_head}, {c.n_embd}, {c.n_ctx}, {c.vocab_size}, 'gpt2', "
                    f"{str(c.tied_embeddings).upper()}, {c.layer_norm_epsilon!r}, '{c.activation}', {c.dropout!r}, "
                    f"{c.initializer_range!r}, '{note}')")
    out.append(stmt(f"INSERT INTO llm_model_config ({cols}) VALUES " + ", ".join(rows),
                    f"The standard GPT-2 sizes; '{DEFAULT_CONFIG}' is the default."))
    out.append(stmt(f"""
        CREATE TABLE llm_model (
          name TEXT PRIMARY KEY CHECK (name <> '' AND NOT name LIKE '@%' AND octet_length(name) <= 200),
          config TEXT NOT NULL REFERENCES llm_model_config (name),
          created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),  -- tells a re-created model apart
          step BIGINT NOT NULL DEFAULT 0,
          note TEXT,
          {OWNER}
        )""", "A model: a name bound to a config; its parameters are llm_tensor rows (model = name, "
              "role = 'param'). step counts optimizer steps taken. Names starting with '@' are reserved "
              "(checkpoint snapshots, see llm_checkpoint)."))
    return "\n".join(out)


def _config_get() -> str:
    body = plpgsql("r llm_model_config; v_known TEXT;", """
        SELECT * INTO r FROM llm_model_config WHERE name = p_config;
        IF NOT FOUND THEN
          v_known := (
            @known
          );
          RAISE EXCEPTION 'pg_llm: unknown model config "%"', p_config
            USING HINT = format('Known configs: %s. Add one with INSERT INTO llm_model_config '
                                '(name, n_layer, n_head, n_embd, n_ctx, vocab_size) VALUES (...).', v_known);
        END IF;
        RETURN r;
    """, known=KNOWN_CONFIGS)
    return function("llm_model_config_get", "p_config TEXT", "llm_model_config", body, volatility="STABLE",
                    note="A config row by name, or a clear error listing the known configs.")


def _size_expr(sym: str) -> str:
    return {"V": "c.vocab_size", "T": "c.n_ctx", "C": "c.n_embd", "3C": "3 * c.n_embd", "4C": "4 * c.n_embd"}[sym]


def _emit_row(name_expr: str, shape: Shape) -> str:
    return f"name := {name_expr}; shape := ARRAY[{', '.join(_size_expr(s) for s in shape)}]; RETURN NEXT;"


def _param_names() -> str:
    top = [_emit_row(f"'{n}'", s) for n, s in EMBEDDINGS]
    layer = ["  " + _emit_row(f"'h.' || i || '.{n}'", s) for n, s in LAYER]
    final = [_emit_row(f"'{n}'", s) for n, s in FINAL]
    head = _emit_row(f"'{UNTIED_HEAD[0]}'", UNTIED_HEAD[1])
    body = plpgsql("c llm_model_config;", "\n".join([
        "c := llm_model_config_get(p_config);", *top, "FOR i IN 0 .. c.n_layer - 1 LOOP", *layer, "END LOOP;",
        *final, "IF NOT c.tied_embeddings THEN", "  " + head, "END IF;", "RETURN;"]))
    return function("llm_param_names", "p_config TEXT", "TABLE(name TEXT, shape INT[])", body, volatility="STABLE",
                    note="The parameter tensors a config needs, in Hugging Face state-dict order: HF GPT-2 names "
                         "without 'transformer.', Conv1D weights as [in, out]; lm_head only when untied.")


def _model_get() -> str:
    body = plpgsql("v_config TEXT; v_known TEXT;", """
        v_config := (
          @config
        );
        IF v_config IS NULL THEN
          v_known := (
            @known
          );
          RAISE EXCEPTION 'pg_llm: unknown model "%"', p_name
            USING HINT = format('Known models: %s. Create one with SELECT llm_model_create(''%s'', ''%s'') or '
                                'pg-llm model import --name %s PATH.', v_known, p_name, 'gpt2-small', p_name);
        END IF;
        RETURN llm_model_config_get(v_config);
    """, config="SELECT m.config FROM llm_model AS m WHERE m.name = p_name", known=KNOWN_MODELS)
    return function("llm_model_get", "p_name TEXT", "llm_model_config", body, volatility="STABLE",
                    note="The config row of a model, or a clear error listing the known models.")


def _create_drop() -> str:
    body = plpgsql("r llm_model; c llm_model_config; v_exists BOOLEAN;", """
        IF p_name IS NULL OR p_name = '' THEN
          RAISE EXCEPTION 'pg_llm: a model needs a non-empty name'
            USING HINT = 'e.g. SELECT llm_model_create(''my_model'', ''gpt2-small'').';
        END IF;
        IF octet_length(p_name) > 200 THEN
          RAISE EXCEPTION 'pg_llm: a model name has at most 200 bytes, got %', octet_length(p_name)
            USING HINT = 'Pick a shorter name (tensor names such as h.11.attn.c_attn.weight are stored with it).';
        END IF;
        IF p_name LIKE '@%' THEN
          RAISE EXCEPTION 'pg_llm: model names starting with "@" are reserved (checkpoint snapshots), got "%"', p_name
            USING HINT = 'Pick a name that does not start with "@".';
        END IF;
        c := llm_model_config_get(p_config);
        v_exists := EXISTS (
          @exists
        );
        IF v_exists THEN
          RAISE EXCEPTION 'pg_llm: model "%" already exists', p_name
            USING HINT = format('Drop it first with SELECT llm_model_drop(''%s''), or import with --replace.',
                                p_name);
        END IF;
        @ins;
        SELECT * INTO r FROM llm_model WHERE name = p_name;
        RETURN r;
    """, exists="SELECT 1 FROM llm_model AS m WHERE m.name = p_name",
        ins="INSERT INTO llm_model (name, config, note) VALUES (p_name, p_config, p_note)")
    out = [function("llm_model_create", f"p_name TEXT, p_config TEXT DEFAULT '{DEFAULT_CONFIG}', "
                    "p_note TEXT DEFAULT NULL", "llm_model", body,
                    note="Register a model bound to a config (no tensors yet: import or initialize them).")]
    body = plpgsql("v_n BIGINT; v_exists BOOLEAN; v_known TEXT;", """
        v_exists := EXISTS (
          @exists
        );
        IF NOT v_exists AND NOT p_if_exists THEN
          v_known := (
            @known
          );
          RAISE EXCEPTION 'pg_llm: unknown model "%"', p_name USING HINT = format('Known models: %s.', v_known);
        END IF;
        PERFORM llm_model_writable(p_name, 'llm_model_drop', TRUE);
        @del_tensors;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        @del_model;
        RETURN v_n;
    """, exists="SELECT 1 FROM llm_model AS m WHERE m.name = p_name", known=KNOWN_MODELS,
        del_tensors="DELETE FROM llm_tensor WHERE model = p_name",
        del_model="DELETE FROM llm_model WHERE name = p_name")
    out.append(function("llm_model_drop", "p_name TEXT, p_if_exists BOOLEAN DEFAULT FALSE", "BIGINT", body,
                        note="Drop a model and every tensor of it (params, grads, Adam state, scratch); returns "
                             "how many tensors were dropped. Its config row stays."))
    return "\n".join(out)


def _check() -> str:
    missing = """
        SELECT count(*)::TEXT || ' missing, e.g. ' || array_to_string((array_agg(p.name ORDER BY p.k))[1:5], ', ')
        FROM llm_param_names(v_config) WITH ORDINALITY AS p(name, shape, k)
        LEFT JOIN llm_tensor AS v ON v.model = p_name AND v.role = 'param' AND v.name = p.name AND v.id > 0
        WHERE v.id IS NULL
        HAVING count(*) > 0"""
    wrong = """
        SELECT string_agg(format('%s is %s, expected %s', p.name, llm_shape_text(v.shape), llm_shape_text(p.shape)),
                          '; ' ORDER BY p.k)
        FROM llm_param_names(v_config) WITH ORDINALITY AS p(name, shape, k)
        JOIN llm_tensor AS v ON v.model = p_name AND v.role = 'param' AND v.name = p.name AND v.id > 0
        WHERE v.shape <> p.shape"""
    extra = """
        SELECT string_agg(v.name, ', ' ORDER BY v.name)
        FROM llm_tensor AS v
        WHERE v.model = p_name AND v.role = 'param' AND v.id > 0
          AND NOT v.name IN (SELECT p.name FROM llm_param_names(v_config) AS p)"""
    tiles = "SELECT count(llm_tensor_validate(v.id)) FROM llm_tensor AS v " \
            "WHERE v.model = p_name AND v.role = 'param' AND v.id > 0"
    body = plpgsql("c llm_model_config; v_config TEXT; v_problem TEXT; v_n BIGINT;", """
        c := llm_model_get(p_name);
        v_config := c.name;
        v_problem := (
          @missing
        );
        IF v_problem IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: model "%" (config %) lacks parameter tensors: %', p_name, v_config, v_problem
            USING HINT = 'Import weights with pg-llm model import, or list them with llm_param_names(config).';
        END IF;
        v_problem := (
          @wrong
        );
        IF v_problem IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: model "%" (config %) has tensors of the wrong shape: %', p_name, v_config, v_problem
            USING HINT = 'Re-import the weights (pg-llm model import --replace), or bind the model to their config.';
        END IF;
        v_problem := (
          @extra
        );
        IF v_problem IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: model "%" (config %) has unexpected parameter tensors: %', p_name, v_config,
            v_problem USING HINT = 'Expected names are listed by llm_param_names(config).';
        END IF;
        IF p_tiles THEN
          v_n := (
            @tiles
          );
        END IF;
        RETURN c;
    """, missing=missing, wrong=wrong, extra=extra, tiles=tiles)
    return function("llm_model_check", "p_name TEXT, p_tiles BOOLEAN DEFAULT FALSE", "llm_model_config", body,
                    volatility="STABLE", note="Check that a model has exactly the parameter tensors of its config "
                    "with the right shapes (and, with p_tiles, every tile); returns its config row.")


def _view() -> str:
    return stmt("""
        CREATE VIEW llm_models AS
        SELECT m.name, m.config, c.n_layer, c.n_head, c.n_embd, c.n_ctx, c.vocab_size, m.step,
               coalesce(s.tensors, 0) AS tensors, coalesce(s.params, 0) AS params, m.created_at, m.note,
               m.owner
        FROM llm_model AS m
        JOIN llm_model_config AS c ON c.name = m.config
        LEFT JOIN LATERAL (
          SELECT count(*) AS tensors, sum(v.shape[1]::BIGINT * coalesce(v.shape[2], 1))::BIGINT AS params
          FROM llm_tensor AS v
          WHERE v.model = m.name AND v.role = 'param' AND v.id > 0
        ) AS s ON TRUE""", "Every model with its config sizes, optimizer step, stored parameter count and owner.")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), _config_get(), _param_names(), _model_get(),
                      _create_drop(), _check(), _view()])
