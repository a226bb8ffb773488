"""Inference fan-out (docs/scaleout.md): llm_generate, llm_perplexity and llm_perplexity_texts run on the ranks of
a cluster, called from the coordinator through PL/Proxy, with the results of the single-node functions.

- Text is encoded (and generated tokens decoded) on the coordinator with its tokenizer, exactly as the single-node
  function does it; ranks receive token ids, so they need no tokenizer and cannot tokenize differently.
- Routing: llm_cluster_generate and llm_cluster_perplexity run on one rank, abs(hashtext(key) % n) for a key
  (the partition PL/Proxy's `RUN ON hashtext(key)` picks with modular_mapping; stable while the cluster has n
  ranks) or a uniformly random one without (RUN ON ANY). The coordinator picks the rank itself and calls it
  with `SPLIT p_ranks; RUN ON p_ranks` (api/cluster.py), so it knows which rank answered.
  llm_cluster_perplexity_texts sends every rank a share of the texts (balanced by tokens, longest first), in
  parallel: p_ranks, p_ords and p_lists are SPLIT together, element i going to rank p_ranks[i].
- Before anything is routed, llm_cluster_ready asks every rank (one parallel round trip) for a version of the
  model: md5 of the build, config, step, end-of-text id and the (ctid, xmin) of the model's parameter tiles and
  tensor rows: a row version changes whenever a row is written. If the coordinator's and every rank's versions
  equal those of the caller's last successful full check (table llm_cluster_verified), nothing changed anywhere
  since and the call is routed; otherwise llm_cluster_inspect (llm_cluster_check: build, config, step, every
  tensor's checksum) runs first and refuses a diverging rank with its pg_llm: error and HINT.
- Errors raised on a rank (bad sampling arguments, ...) come back as the single-node function raises them (PL/
  Proxy's "REMOTE ERROR" prefix removed, same SQLSTATE and HINT), with a DETAIL naming the rank.
"""
from __future__ import annotations

import textwrap

from pg_llm.api.cluster_check import STALE
from pg_llm.api.generate import ARGS as GEN_ARGS
from pg_llm.api.perplexity import OUT, STRIDE, texts_body
from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import INTERNAL, OWNER
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "api/cluster_infer.sql"
ORDER = 92  # after api/cluster.sql (llm_cluster_inspect, llm_cluster_ranks_of)

GEN = [(a.split()[0], a.split()[1]) for a in GEN_ARGS.split(", ")]  # llm_generate's sampling arguments
GEN_P = ", ".join(f"p_{n} {t}" for n, t in GEN)
GEN_PASS = ", ".join(f"p_{n}" for n, _ in GEN)
SCORES = "perplexity FLOAT8, tokens_scored BIGINT, mean_loss FLOAT8"
PX = f"{INTERNAL}.llm_cluster_px"
# (proxy, arguments after p_cluster, returns, rank-side function[, SPLIT]): created by llm_cluster_proxies()
PROXIES: tuple[tuple[str, ...], ...] = (
    ("llm_cluster_px_version", "p_ranks INT[], p_model TEXT", "TABLE(rank INT, version TEXT)",
     "llm_cluster_rank_version(p_ranks, p_model)"),
    ("llm_cluster_px_generate", f"p_ranks INT[], p_model TEXT, p_eos_id INT, p_tokens INT[], {GEN_P}",
     "TABLE(rank INT, tokens INT[])", f"llm_cluster_rank_generate(p_ranks, p_model, p_eos_id, p_tokens, {GEN_PASS})"),
    ("llm_cluster_px_perplexity", "p_ranks INT[], p_model TEXT, p_tokens INT[], p_stride INT",
     f"TABLE(rank INT, {SCORES})", "llm_cluster_rank_perplexity(p_ranks, p_model, p_tokens, p_stride)"),
    ("llm_cluster_px_perplexity_lists", "p_ranks INT[], p_ords INT[], p_model TEXT, p_lists TEXT[], p_stride INT",
     f"TABLE(rank INT, ord INT, {SCORES})",
     "llm_cluster_rank_perplexity_lists(p_ranks, p_ords, p_model, p_lists, p_stride)", "p_ranks, p_ords, p_lists"),
)
LISTS = """
          CONTINUE WHEN texts[i] IS NULL;
          v_t := texts[i]::INT[];"""
# calls a proxy in a block that turns what a rank raised into the single-node error (llm_cluster_remote_error)
REMOTE = """
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                  v_state = RETURNED_SQLSTATE;
          PERFORM llm_cluster_remote_error(cluster, {rank}, v_msg, v_detail, v_hint, v_state);
        END;"""
REMOTE_VARS = "v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT;"
MAPPING_HINT = ("format('Every rank of SELECT * FROM llm_cluster_ranks WHERE cluster = %L needs a running server "
                "and pg_llm; the calling role needs USAGE on foreign server %I and a user mapping for it "
                "(docs/scaleout.md).', p_cluster, llm_cluster_server(p_cluster))")


def row_versions(model: str, roles: str) -> str:
    """The row versions (ctid, xmin) of a model's tensor rows and tiles of the roles `roles` selects, as one
    string: any write of one of them changes it."""
    return f"""
        SELECT string_agg(concat_ws(':', v.id, v.role, v.ctid, v.xmin, t.tr, t.tc, t.ctid, t.xmin), ';'
                          ORDER BY v.id, t.tr, t.tc)
        FROM llm_tensor AS v
        JOIN llm_tile AS t ON t.tensor_id = v.id
        WHERE v.model = {model} AND {roles} AND v.id > 0"""


def _rank_side() -> str:
    """What the coordinator calls on a rank (every install has these: a database is a rank because a coordinator
    registered it)."""
    tiles = row_versions("m.name", "v.role = 'param'")
    version = f"""
        SELECT p_ranks[1], CASE WHEN m.name IS NOT NULL THEN md5(concat_ws(E'\\n', llm_build(), m.step::TEXT,
               (to_jsonb(k) - 'owner' - 'note')::TEXT, llm_generate_eos(k)::TEXT, ({tiles}))) END
        FROM (SELECT 1) AS one
        LEFT JOIN llm_model AS m ON m.name = p_model
        LEFT JOIN llm_model_config AS k ON k.name = m.config"""
    body = plpgsql("", """
        RETURN QUERY
          @version;
    """, version=version)  # PL/pgSQL: llm_build() is created at the end of the install script
    out = [function("llm_cluster_rank_version", "p_ranks INT[], p_model TEXT", "TABLE(rank INT, version TEXT)",
                    body, volatility="STABLE", note="""
        A version of model p_model here (NULL: no such model): md5 of the pg_llm build, step, config, end-of-text id
        and the row versions (ctid, xmin) of its parameter tensors and tiles. Any write of a tile, a tensor row,
        the step or the config changes it; equal versions mean unchanged rows (api/cluster_infer.py).""")]
    gen = plpgsql("c llm_model_config; v_eos INT;", f"""
        c := llm_model_get(p_model);
        v_eos := llm_generate_eos(c);
        IF p_eos AND v_eos IS DISTINCT FROM p_eos_id THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_generate: the end-of-text id of tokenizer "%" is % on rank % '
            '(database "%"), % on the coordinator', c.tokenizer, v_eos, p_ranks[1], current_database(), p_eos_id
            USING HINT = 'Import the coordinator''s tokenizer on the rank (pg-llm tokenizer import), or pass eos => '
                         'false.';
        END IF;
        rank := p_ranks[1];
        tokens := ARRAY(SELECT s.out_token FROM llm_generate_steps(p_model, p_tokens, {GEN_PASS}) AS s
                        ORDER BY s.out_step);
        RETURN NEXT;
    """)
    out.append(function("llm_cluster_rank_generate", f"p_ranks INT[], p_model TEXT, p_eos_id INT, p_tokens INT[], "
                        f"{GEN_P}", "TABLE(rank INT, tokens INT[])", "#variable_conflict use_column\n" + gen,
                        settings=KERNEL_SETTINGS, note="""
        llm_generate's decoding on a rank (through PL/Proxy): the new token ids after p_tokens (the prompt the
        coordinator encoded), refused first when eos is on and this rank's end-of-text id is not p_eos_id."""))
    out.append(function(
        "llm_cluster_rank_perplexity", "p_ranks INT[], p_model TEXT, p_tokens INT[], p_stride INT",
        f"TABLE(rank INT, {SCORES})", "SELECT p_ranks[1], q.perplexity, q.tokens_scored, q.mean_loss "
        "FROM llm_perplexity_tokens(p_model, p_tokens, p_stride) AS q", language="sql", settings=KERNEL_SETTINGS,
        note="llm_perplexity on a rank: llm_perplexity_tokens of the ids the coordinator encoded."))
    out.append(function(
        "llm_perplexity_lists", "model TEXT, texts TEXT[], stride INT DEFAULT NULL",
        f"TABLE(ord INT, {SCORES})", texts_body(LISTS), settings=KERNEL_SETTINGS, note="""
        llm_perplexity_texts of texts already encoded: each element an int[] literal of token ids (NULL scores
        nothing); the same body (api/perplexity.py texts_body), so the same packing and numbers."""))
    out.append(function(
        "llm_cluster_rank_perplexity_lists", "p_ranks INT[], p_ords INT[], p_model TEXT, p_lists TEXT[], p_stride INT",
        f"TABLE(rank INT, ord INT, {SCORES})", "SELECT p_ranks[1], p_ords[q.ord], q.perplexity, q.tokens_scored, "
        "q.mean_loss FROM llm_perplexity_lists(p_model, p_lists, p_stride) AS q", language="sql",
        settings=KERNEL_SETTINGS, note="""
        A rank's share of llm_cluster_perplexity_texts (through PL/Proxy, SPLIT): its texts' scores, each with the
        index (p_ords) of the text in the caller's array."""))
    return "\n".join(out)


def versions_table(name: str, note: str) -> str:
    """A table of the row versions (one per node) at which a role last saw a cluster's copies of a model agree:
    one row per cluster, model and role, each role trusting only its own (row-level security, api/privileges)."""
    return stmt(f"""
        CREATE TABLE {name} (
          cluster TEXT NOT NULL,
          model TEXT NOT NULL,
          versions TEXT[] NOT NULL,
          checked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          {OWNER},
          PRIMARY KEY (cluster, model, owner)
        )""", note)


def _table() -> str:
    return versions_table(f"{INTERNAL}.llm_cluster_verified", "The last full check (llm_cluster_inspect) that passed "
                          "for a cluster, model and calling role, with the versions (llm_cluster_rank_version: the "
                          "coordinator's, then rank 0, 1, ...) it was made at. A role trusts only its own rows "
                          "(row-level security: it writes only those).")


def _ready() -> str:
    lookup = f"""
        SELECT 1 FROM {INTERNAL}.llm_cluster_verified AS v
        WHERE v.cluster = p_cluster AND v.model = p_model AND v.owner = CURRENT_USER::TEXT::REGROLE
          AND v.versions = v_versions"""
    remember = f"""
        INSERT INTO {INTERNAL}.llm_cluster_verified (cluster, model, versions) VALUES (p_cluster, p_model, v_versions)
        ON CONFLICT (cluster, model, owner) DO UPDATE SET versions = excluded.versions, checked_at = now()"""
    body = plpgsql("v_ranks INT[]; v_versions TEXT[];", f"""
        PERFORM llm_cluster_require();
        v_ranks := llm_cluster_ranks_of(p_cluster);
        PERFORM llm_model_check(p_model);
        PERFORM llm_cluster_proxies();
        -- PL/Proxy checks the mapping only when it first loads the cluster in a session; afterwards it connects
        -- as the session user (user= of add_connection) when there is none: refuse every time instead.
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_user_mappings AS u
                       WHERE u.srvname = llm_cluster_server(p_cluster)
                         AND (u.umuser = 0 OR u.usename = CURRENT_USER::TEXT)) THEN
          RAISE EXCEPTION 'pg_llm: cluster "%": role % has no user mapping for foreign server %', p_cluster,
            CURRENT_USER, llm_cluster_server(p_cluster)
            USING HINT = format('CREATE USER MAPPING FOR %I SERVER %I OPTIONS (user ..., password ...): the login '
                                'the ranks know this role by (docs/scaleout.md).', CURRENT_USER,
                                llm_cluster_server(p_cluster));
        END IF;
        FOR i IN 1 .. 2 LOOP
          BEGIN
            v_versions := ARRAY(SELECT x.version FROM llm_cluster_rank_version(ARRAY[-1], p_model) AS x)
              || ARRAY(SELECT x.version FROM {PX}_version(p_cluster, v_ranks, p_model) AS x ORDER BY x.rank);
            EXIT;
          EXCEPTION WHEN OTHERS THEN
            CONTINUE WHEN i = 1 AND SQLERRM ~ {STALE};  -- a connection dead since its last use: once more
            RAISE EXCEPTION 'pg_llm: cluster "%": a rank did not answer: %', p_cluster, SQLERRM
              USING HINT = {MAPPING_HINT};
          END;
        END LOOP;
        IF NOT EXISTS (
          @lookup
        ) THEN
          PERFORM count(*) FROM llm_cluster_inspect(p_cluster, p_model, FALSE);  -- raises for a diverging rank
          @remember;
        END IF;
        RETURN v_ranks;
    """, lookup=lookup, remember=remember)
    out = [function("llm_cluster_ready", "p_cluster TEXT, p_model TEXT", "INT[]", body, note="""
        Before a routed inference call: the cluster's ranks, once every rank and the coordinator hold model p_model
        as the caller's last passing full check saw them (one parallel round trip for their versions); otherwise
        the full check (llm_cluster_inspect) runs now and refuses a rank that differs, with its HINT.""")]
    raise_it = plpgsql("v_msg TEXT; v_detail TEXT; v_hint TEXT; v_where TEXT;", r"""
        -- PL/Proxy raises "<proxy>(<n>): [<database>] REMOTE ERROR: <message>", "Remote detail: ..." and
        -- "Remote hint: ..."
        v_where := format('%s of cluster "%s"', coalesce('rank ' || p_rank, 'a rank'), p_cluster)
          || coalesce(format(' (database "%s")', substring(p_msg FROM '\[([^]]*)\] REMOTE ERROR: ')), '');
        IF position('REMOTE ERROR: ' IN p_msg) = 0 THEN
          RAISE EXCEPTION 'pg_llm: % did not answer: %', v_where, p_msg
            USING HINT = 'Is the rank''s server running and reachable? SELECT * FROM llm_cluster_ranks shows its '
                         'conninfo; authentication: docs/scaleout.md.';
        END IF;
        v_msg := substr(p_msg, position('REMOTE ERROR: ' IN p_msg) + 14);
        v_detail := concat_ws(' ', nullif(regexp_replace(p_detail, '^Remote detail: ', ''), ''),
                              format('(raised on %s)', v_where));
        v_hint := regexp_replace(p_hint, '^Remote hint: ', '');
        IF v_hint IS NULL THEN
          RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = p_state;
        END IF;
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = p_state;
    """)
    out.append(function("llm_cluster_remote_error", "p_cluster TEXT, p_rank INT, p_msg TEXT, p_detail TEXT, "
                        "p_hint TEXT, p_state TEXT", "VOID", raise_it, note="""
        Raise what a rank raised (caught around a PL/Proxy call) as the single-node function raises it: the
        message without PL/Proxy's prefix, its HINT and SQLSTATE, the rank in the DETAIL."""))
    pick = """
        SELECT CASE WHEN p_key IS NULL THEN p_ranks[1 + floor(random() * cardinality(p_ranks))::INT]
                    ELSE p_ranks[1 + abs(hashtext(p_key) % cardinality(p_ranks))] END"""
    out.append(function("llm_cluster_pick", "p_ranks INT[], p_key TEXT", "INT", pick, language="sql", note="""
        The rank a call goes to: abs(hashtext(key) % n), PL/Proxy's partition for RUN ON hashtext(key) with
        modular_mapping; a random rank (RUN ON ANY) without a key."""))
    out.append(function("llm_cluster_route", "cluster TEXT, key TEXT DEFAULT NULL", "INT",
                        "SELECT llm_cluster_pick(llm_cluster_ranks_of(cluster), key)", language="sql", note="""
        The rank of cluster `cluster` that llm_cluster_generate / llm_cluster_perplexity run on for `key` (the
        same while the cluster has the same ranks); without a key, a random rank."""))
    return "\n".join(out)


def _generate() -> str:
    call = f"""
        SELECT g.tokens FROM {PX}_generate(cluster, ARRAY[v_rank], model, llm_generate_eos(c), v_tokens,
                                          max_new_tokens, temperature, top_k, top_p, seed, eos, use_cache) AS g"""
    body = plpgsql(f"c llm_model_config; v_ranks INT[]; v_rank INT; v_tokens INT[]; v_new INT[]; {REMOTE_VARS}", """
        PERFORM llm_cluster_ranks_of(cluster);
        c := llm_model_get(model);
        IF prompt IS NULL OR prompt = '' THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_generate: empty prompt' USING HINT = 'Give at least one token of text.';
        END IF;
        v_ranks := llm_cluster_ready(cluster, model);
        v_rank := llm_cluster_pick(v_ranks, key);
        v_tokens := llm_encode(prompt, c.tokenizer);
        BEGIN
          v_new := (
            @call
          );""" + REMOTE.format(rank="v_rank") + """
        RETURN llm_decode(v_new, c.tokenizer);
    """, call=call)
    return function("llm_cluster_generate", f"cluster TEXT, model TEXT, prompt TEXT, {GEN_ARGS}, key TEXT DEFAULT NULL",
                    "TEXT", body, settings=KERNEL_SETTINGS, note="""
        llm_generate(model, prompt, ...) on one rank of a cluster: the rank of key (llm_cluster_route), or any rank
        without one. The same text as llm_generate on the coordinator (prompt encoded and new tokens decoded here),
        after llm_cluster_ready has checked that every rank holds the coordinator's model.""")


def _perplexity() -> str:
    call = f"""
        SELECT q.perplexity, q.tokens_scored, q.mean_loss FROM {PX}_perplexity(cluster, ARRAY[v_rank], model, v_tokens,
                                                                              stride) AS q"""
    body = plpgsql(f"c llm_model_config; v_ranks INT[]; v_rank INT; v_tokens INT[]; {REMOTE_VARS}", """
        PERFORM llm_cluster_ranks_of(cluster);
        c := llm_model_get(model);
        IF $3 IS NULL OR $3 = '' THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_perplexity: empty text' USING HINT = 'Give at least two tokens of text.';
        END IF;
        v_ranks := llm_cluster_ready(cluster, model);
        v_rank := llm_cluster_pick(v_ranks, key);
        v_tokens := llm_encode($3, c.tokenizer);
        BEGIN
          @call INTO perplexity, tokens_scored, mean_loss;""" + REMOTE.format(rank="v_rank") + """
    """, call=call)
    return function("llm_cluster_perplexity", f"cluster TEXT, model TEXT, text TEXT, stride INT DEFAULT NULL, "
                    f"key TEXT DEFAULT NULL, {OUT}", "RECORD", body, settings=KERNEL_SETTINGS, note="""
        llm_perplexity(model, text, stride) on one rank of a cluster, routed as llm_cluster_generate.""")


def _texts() -> str:
    assign = """
        SELECT u.k, u.len FROM unnest(v_lens) WITH ORDINALITY AS u(len, k) ORDER BY u.len DESC, u.k"""
    call = f"SELECT * FROM {PX}_perplexity_lists(cluster, v_to, v_ords, model, v_lists, stride) AS q"
    declare = f"""
        c llm_model_config; v_stride INT; v_ranks INT[]; v_t INT[]; v_n INT; v_top INT; v_ords INT[] := '{{}}';
        v_lists TEXT[] := '{{}}'; v_lens INT[] := '{{}}'; v_to INT[]; v_load BIGINT[]; v_best INT; r RECORD;
        v_p FLOAT8[]; v_c BIGINT[]; v_m FLOAT8[]; {REMOTE_VARS}"""
    body = plpgsql(declare, """
        PERFORM llm_cluster_ranks_of(cluster);
        c := llm_model_get(model);""" + STRIDE + """
        IF texts IS NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_perplexity_texts: texts is NULL'
            USING HINT = 'Pass an array of texts, e.g. ARRAY(SELECT body FROM docs ORDER BY id).';
        END IF;
        v_ranks := llm_cluster_ready(cluster, model);
        FOR i IN 1 .. cardinality(texts) LOOP  -- encoded here, as llm_perplexity_texts would
          CONTINUE WHEN texts[i] IS NULL OR texts[i] = '';
          v_t := llm_encode(texts[i], c.tokenizer);
          v_n := cardinality(v_t);
          CONTINUE WHEN v_n < 2;
          v_top := (SELECT max(u.id) FROM unnest(v_t) AS u(id));
          IF v_top >= c.vocab_size THEN
            RAISE EXCEPTION 'pg_llm: llm_cluster_perplexity_texts: text % encodes to token id %, outside the '
              'vocabulary [0, %) of model "%"', i, v_top, c.vocab_size, model
              USING HINT = 'The model''s config names its tokenizer: its vocabulary must fit vocab_size.';
          END IF;
          v_ords := v_ords || i;
          v_lists := v_lists || v_t::TEXT;
          v_lens := v_lens || v_n;
        END LOOP;
        v_p := array_fill(NULL::FLOAT8, ARRAY[cardinality(texts)]);
        v_c := array_fill(0::BIGINT, ARRAY[cardinality(texts)]);
        v_m := array_fill(NULL::FLOAT8, ARRAY[cardinality(texts)]);
        IF cardinality(v_ords) > 0 THEN
          -- each text to the least loaded rank, longest first (load = tokens)
          v_to := array_fill(NULL::INT, ARRAY[cardinality(v_ords)]);
          v_load := array_fill(0::BIGINT, ARRAY[cardinality(v_ranks)]);
          FOR r IN
            @assign
          LOOP
            v_best := 1;
            FOR j IN 2 .. cardinality(v_ranks) LOOP
              IF v_load[j] < v_load[v_best] THEN
                v_best := j;
              END IF;
            END LOOP;
            v_load[v_best] := v_load[v_best] + r.len;
            v_to[r.k] := v_ranks[v_best];
          END LOOP;
          BEGIN
            FOR r IN
              @call
            LOOP
              v_p[r.ord] := r.perplexity;
              v_c[r.ord] := r.tokens_scored;
              v_m[r.ord] := r.mean_loss;
            END LOOP;""" + textwrap.indent(REMOTE.format(rank="NULL"), "  ") + """
        END IF;
        RETURN QUERY SELECT i.i, v_p[i.i], v_c[i.i], v_m[i.i] FROM generate_subscripts(texts, 1) AS i(i) ORDER BY i.i;
    """, assign=assign, call=call)
    return function("llm_cluster_perplexity_texts", "cluster TEXT, model TEXT, texts TEXT[], stride INT DEFAULT NULL",
                    f"TABLE(ord INT, {SCORES})", body, settings=KERNEL_SETTINGS, note="""
        llm_perplexity_texts(model, texts, stride) over every rank of a cluster in parallel: the texts are encoded
        here and split over the ranks (balanced by tokens); a row per text in input order, the single-node
        function's values.""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _rank_side(), _table(), _ready(), _generate(), _perplexity(),
                      _texts()])
