"""GPT-2's byte-level BPE tokenizer in SQL and PL/pgSQL: llm_encode(text) -> int[], llm_decode(int[]) -> text.

Tables: llm_tokenizer (one row per imported tokenizer; `pg-llm tokenizer import`), llm_bpe_vocab (id, token
bytes, printable form, special flag), llm_bpe_merges (rank, left id, right id, merged id) and the UNLOGGED
cache llm_bpe_cache (pre-token -> ids).

Encoding, exactly as GPT-2 / tiktoken:
1. the text is split at special tokens (<|endoftext|> -> 50256), which are never BPE'd;
2. each segment is cut into pre-tokens by GPT-2's pattern, translated for PostgreSQL's regex engine with
   exact Unicode classes (see tokenizer_classes.py);
3. each distinct pre-token not yet in llm_bpe_cache is BPE'd, all of them at once in one recursive query:
   start from its UTF-8 bytes (one token each), merge the adjacent pair of lowest merge rank, repeat until
   no pair is a merge; results of pre-tokens up to 255 bytes are cached;
4. the ids of the pre-tokens are concatenated in order.
Decoding concatenates the token bytes and reads them as UTF-8; byte sequences that are not valid UTF-8 on
their own (a token sequence cut inside a character) become U+FFFD exactly as Python's
bytes.decode('utf-8', 'replace') does, one per maximal invalid subpart; so does a NUL byte, which text cannot
hold. llm_decode_bytes() returns the exact bytes."""
from __future__ import annotations

from pg_llm.api.tokenizer_classes import pg_pattern
from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.sqlfmt import sql

SQL_FILE = "api/tokenizer.sql"
ORDER = 70

SETTINGS = ("jit = off",)
CACHE_MAX_BYTES = 255  # longer pre-tokens (long runs of letters or spaces) are BPE'd on every call
TOKENIZER_HINT = "Import one with: pg-llm tokenizer import --name NAME FILES (see SELECT name FROM llm_tokenizer)."


def _tables() -> str:
    out = [stmt("""
        CREATE TABLE llm_tokenizer (
          name TEXT PRIMARY KEY,
          pretokenizer TEXT NOT NULL DEFAULT 'gpt2' CHECK (pretokenizer IN ('gpt2')),
          n_vocab INT NOT NULL CHECK (n_vocab >= 256),
          n_merges INT NOT NULL CHECK (n_merges >= 0),
          byte_ids INT[] NOT NULL CHECK (cardinality(byte_ids) = 256),
          special_re TEXT,
          source TEXT NOT NULL DEFAULT '',
          imported_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )""", "One row per imported byte-level BPE tokenizer. byte_ids[b + 1] is the token of byte b; special_re "
              "matches its special tokens (NULL: none).")]
    out.append(stmt("""
        CREATE TABLE llm_bpe_vocab (
          tokenizer TEXT NOT NULL REFERENCES llm_tokenizer (name) ON DELETE CASCADE,
          id INT NOT NULL CHECK (id >= 0),
          token BYTEA NOT NULL,
          printable TEXT NOT NULL,
          special BOOLEAN NOT NULL DEFAULT FALSE,
          PRIMARY KEY (tokenizer, id),
          UNIQUE (tokenizer, token)
        )""", "Token bytes by id. printable is GPT-2's byte-level form (' the' is 'Ġthe'); special tokens are "
              "matched as text."))
    out.append(stmt("CREATE INDEX llm_bpe_vocab_special ON llm_bpe_vocab (tokenizer, printable) WHERE special"))
    out.append(stmt("""
        CREATE TABLE llm_bpe_merges (
          tokenizer TEXT NOT NULL REFERENCES llm_tokenizer (name) ON DELETE CASCADE,
          rank INT NOT NULL CHECK (rank >= 0),
          left_id INT NOT NULL,
          right_id INT NOT NULL,
          merged_id INT NOT NULL,
          PRIMARY KEY (tokenizer, rank),
          UNIQUE (tokenizer, left_id, right_id)
        )""", "BPE merges: the pair (left_id, right_id) becomes merged_id; a lower rank merges first."))
    out.append(stmt(f"""
        CREATE UNLOGGED TABLE llm_bpe_cache (
          tokenizer TEXT NOT NULL REFERENCES llm_tokenizer (name) ON DELETE CASCADE,
          piece TEXT COLLATE "C" NOT NULL CHECK (octet_length(piece) <= {CACHE_MAX_BYTES}),
          ids INT[] NOT NULL,
          PRIMARY KEY (tokenizer, piece)
        )""", "BPE result per pre-token, filled by llm_encode. Derived data: UNLOGGED, llm_bpe_cache_clear() "
              "empties it."))
    out.append(stmt("""
        CREATE VIEW llm_tokenizers AS
        SELECT t.name, t.n_vocab, t.n_merges,
               (SELECT array_agg(v.printable ORDER BY v.id) FROM llm_bpe_vocab AS v
                WHERE v.tokenizer = t.name AND v.special) AS specials,
               (SELECT count(*) FROM llm_bpe_cache AS c WHERE c.tokenizer = t.name) AS cached_pieces,
               t.source, t.imported_at
        FROM llm_tokenizer AS t""", "Imported tokenizers with their special tokens and cache size."))
    return "\n".join(out)


def _lookup() -> str:
    pattern = pg_pattern().replace("'", "''")
    out = [function("llm_bpe_pattern", "p_pretokenizer TEXT", "TEXT", f"""
        SELECT CASE p_pretokenizer WHEN 'gpt2' THEN '{pattern}' END""", language="sql", volatility="IMMUTABLE",
        strict=True, parallel="SAFE",
        note="GPT-2's pre-tokenizer as a PostgreSQL ARE (leftmost-longest) pattern with exact \\p{L} / \\p{N} / "
             "\\s classes\n(from the reference tokenizer's Unicode tables; see py/api/tokenizer_classes.py).")]
    body = plpgsql("r llm_tokenizer;", f"""
        SELECT * INTO r FROM llm_tokenizer WHERE name = p_name;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'pg_llm: tokenizer "%" does not exist', p_name
            USING HINT = '{TOKENIZER_HINT}';
        END IF;
        RETURN r;
    """)
    out.append(function("llm_tokenizer_get", "p_name TEXT", "llm_tokenizer", body, volatility="STABLE",
                        note="Catalog row of a tokenizer, or a clear error naming how to import it."))
    return "\n".join(out)


NO_MERGE = 2147483647  # rank of an adjacent pair that is not a merge


def _bpe() -> str:
    q = sql(f"""
        WITH RECURSIVE w (piece, parts, ranks, mids) AS (
          SELECT p.piece, s.parts, r.ranks, r.mids
          FROM unnest(p_pieces) AS p(piece)
          CROSS JOIN llm_tokenizer AS t
          CROSS JOIN LATERAL (
            SELECT ARRAY(SELECT t.byte_ids[get_byte(convert_to(p.piece, 'UTF8'), k) + 1]
                         FROM generate_series(0, octet_length(p.piece) - 1) AS k ORDER BY k) AS parts
            OFFSET 0
          ) AS s
          CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(coalesce(g.rank, {NO_MERGE}) ORDER BY x.i), '{{}}') AS ranks,
                   coalesce(array_agg(coalesce(g.merged_id, -1) ORDER BY x.i), '{{}}') AS mids
            FROM unnest(s.parts[1 : cardinality(s.parts) - 1], s.parts[2 : cardinality(s.parts)])
              WITH ORDINALITY AS x(a, b, i)
            LEFT JOIN llm_bpe_merges AS g ON g.tokenizer = p_tokenizer AND g.left_id = x.a AND g.right_id = x.b
          ) AS r
          WHERE t.name = p_tokenizer AND p.piece <> ''
          UNION ALL
          SELECT w.piece,
                 w.parts[1 : m.i - 1] || w.mids[m.i] || w.parts[m.i + 2 :],
                 w.ranks[1 : m.i - 2]
                   || CASE WHEN m.i > 1 THEN ARRAY[coalesce(lm.rank, {NO_MERGE})] ELSE '{{}}'::INT[] END
                   || CASE WHEN m.i < cardinality(w.ranks) THEN ARRAY[coalesce(rm.rank, {NO_MERGE})]
                           ELSE '{{}}'::INT[] END
                   || w.ranks[m.i + 2 :],
                 w.mids[1 : m.i - 2]
                   || CASE WHEN m.i > 1 THEN ARRAY[coalesce(lm.merged_id, -1)] ELSE '{{}}'::INT[] END
                   || CASE WHEN m.i < cardinality(w.ranks) THEN ARRAY[coalesce(rm.merged_id, -1)]
                           ELSE '{{}}'::INT[] END
                   || w.mids[m.i + 2 :]
          FROM w
          CROSS JOIN LATERAL (
            SELECT u.i FROM unnest(w.ranks) WITH ORDINALITY AS u(r, i)
            WHERE u.r < {NO_MERGE}
            ORDER BY u.r, u.i
            LIMIT 1
          ) AS m
          LEFT JOIN llm_bpe_merges AS lm
            ON m.i > 1 AND lm.tokenizer = p_tokenizer AND lm.left_id = w.parts[m.i - 1] AND lm.right_id = w.mids[m.i]
          LEFT JOIN llm_bpe_merges AS rm
            ON rm.tokenizer = p_tokenizer AND rm.left_id = w.mids[m.i] AND rm.right_id = w.parts[m.i + 2]
        )
        SELECT w.piece, w.parts FROM w WHERE NOT {NO_MERGE} > ANY(w.ranks)""")
    return function("llm_bpe_pieces", "p_tokenizer TEXT, p_pieces TEXT[]", "TABLE(piece TEXT, ids INT[])", q + ";",
                    language="sql", volatility="STABLE", settings=SETTINGS, parallel="SAFE",
                    note="BPE of many pre-tokens at once (no cache). Each piece carries its parts, the merge rank "
                         "and result of\nevery adjacent pair; a round merges the leftmost pair of lowest rank and "
                         "looks up only the two new pairs.\nThe final state of a piece is the one without any "
                         "merge left.")


def _encode() -> str:
    split = """
        SELECT q.piece FROM (
          SELECT s.n, 0 AS k, m.o, m.m[1] AS piece
          FROM unnest(regexp_split_to_array(p_text, v_special_re)) WITH ORDINALITY AS s(seg, n)
          CROSS JOIN LATERAL regexp_matches(s.seg, v_pattern, 'g') WITH ORDINALITY AS m(m, o)
          UNION ALL
          SELECT x.n, 1, 0, x.m[1] FROM regexp_matches(p_text, v_special_re, 'g') WITH ORDINALITY AS x(m, n)
        ) AS q
        ORDER BY q.n, q.k, q.o"""
    fresh = """
        SELECT n FROM unnest(v_distinct) AS n
        WHERE n <> ALL(v_specials)
          AND NOT EXISTS (SELECT 1 FROM llm_bpe_cache AS c WHERE c.tokenizer = p_tokenizer AND c.piece = n)"""
    assemble = """
        WITH d AS MATERIALIZED (
          SELECT c.piece, c.ids FROM llm_bpe_cache AS c
          WHERE c.tokenizer = p_tokenizer AND c.piece = ANY(v_distinct)
          UNION ALL
          SELECT s.piece, ARRAY[s.id] FROM unnest(v_specials, v_special_ids) AS s(piece, id)
          UNION ALL
          SELECT b.piece, b.ids FROM llm_bpe_pieces(p_tokenizer, v_long) AS b
        )
        SELECT count(*) FILTER (WHERE u.j = 1) AS found, array_agg(u.id ORDER BY p.o, u.j) AS ids
        FROM unnest(v_pieces) WITH ORDINALITY AS p(piece, o)
        JOIN d ON d.piece = p.piece
        CROSS JOIN LATERAL unnest(d.ids) WITH ORDINALITY AS u(id, j)"""
    body = plpgsql("""
        r llm_tokenizer;
        v_pattern TEXT;
        v_specials TEXT[];
        v_special_ids INT[];
        v_pieces TEXT[];
        v_distinct TEXT[];
        v_new TEXT[];
        v_long TEXT[];
        v_found BIGINT;
        v_out INT[];
    """, """
        r := llm_tokenizer_get(p_tokenizer);
        v_pattern := llm_bpe_pattern(r.pretokenizer);
        SELECT q.s, q.i INTO v_specials, v_special_ids FROM (
          @specials
        ) AS q;
        IF r.special_re IS NULL OR p_text !~ r.special_re THEN
          v_pieces := ARRAY(
            @pieces
          );
        ELSE
          v_pieces := ARRAY(
            @split
          );
        END IF;
        IF cardinality(v_pieces) = 0 THEN
          RETURN '{}';
        END IF;
        v_distinct := ARRAY(
          @distinct
        );
        v_new := ARRAY(
          @fresh
        );
        v_long := ARRAY(
          @long
        );
        IF cardinality(v_new) > cardinality(v_long) THEN
          BEGIN
            PERFORM (
              @cache
            );
          EXCEPTION WHEN read_only_sql_transaction THEN
            v_long := v_new;  -- a read-only transaction (hot standby): BPE without caching
          END;
        END IF;
        SELECT q.found, q.ids INTO v_found, v_out FROM (
          @assemble
        ) AS q;
        IF v_found IS DISTINCT FROM cardinality(v_pieces)::BIGINT THEN
          RAISE EXCEPTION 'pg_llm: llm_encode lost % of % pre-tokens (llm_bpe_cache cleared concurrently?)',
            cardinality(v_pieces) - coalesce(v_found, 0), cardinality(v_pieces)
            USING HINT = 'Run the statement again.';
        END IF;
        RETURN v_out;
    """, split=split.replace("v_special_re", "r.special_re"), fresh=fresh, assemble=assemble,
        specials="""SELECT coalesce(array_agg(v.printable), '{}') AS s, coalesce(array_agg(v.id), '{}') AS i
                    FROM llm_bpe_vocab AS v WHERE v.tokenizer = p_tokenizer AND v.special""",
        pieces="SELECT m[1] FROM regexp_matches(p_text, v_pattern, 'g') AS m",
        distinct="SELECT DISTINCT n FROM unnest(v_pieces) AS n",
        long=f"SELECT n FROM unnest(v_new) AS n WHERE octet_length(n) > {CACHE_MAX_BYTES}",
        cache=f"""SELECT llm_bpe_cache_fill(p_tokenizer, ARRAY(SELECT n FROM unnest(v_new) AS n
                                                               WHERE octet_length(n) <= {CACHE_MAX_BYTES}))""")
    fill = function("llm_bpe_cache_fill", "p_tokenizer TEXT, p_pieces TEXT[]", "VOID", """
        INSERT INTO llm_bpe_cache (tokenizer, piece, ids)
        SELECT p_tokenizer, b.piece, b.ids FROM llm_bpe_pieces(p_tokenizer, p_pieces) AS b ORDER BY b.piece
        ON CONFLICT DO NOTHING""", language="sql", strict=True, definer=True,
        note="Cache the BPE of pre-tokens. As pg_llm's owner (SECURITY DEFINER): the cache is shared, so no role "
             "may write it directly; this computes every row it stores from the tokenizer's own tables.")
    out = [fill, function("llm_bpe_encode", "p_text TEXT, p_tokenizer TEXT", "INT[]", body, strict=True,
                    settings=SETTINGS + ("plan_cache_mode = force_custom_plan",),
                    note="llm_encode's body: special tokens, pre-tokens, cached BPE, ids in order (custom plans: "
                         "a generic plan\nfor these array queries is up to 10x slower).")]
    out.append(function("llm_encode", "text TEXT, tokenizer TEXT DEFAULT 'gpt2'", "INT[]", """
        SELECT llm_bpe_encode($1, $2)""", language="sql", strict=True,
        note="Token ids of a text, exactly as GPT-2's tokenizer (tiktoken) with special tokens allowed:\n"
             "SELECT llm_encode('Hello world') -> {15496,995}. Fills llm_bpe_cache, hence VOLATILE."))
    return "\n".join(out)


def _decode() -> str:
    lossy = plpgsql("""
        n INT := length(p_bytes);
        i INT := 0;
        v_start INT := 0;
        c INT;
        d INT;
        v_need INT;
        v_lo INT;
        v_hi INT;
        k INT;
        v_parts TEXT[] := '{}';
    """, """
        WHILE i < n LOOP
          c := get_byte(p_bytes, i);
          IF c BETWEEN 1 AND 127 THEN
            i := i + 1;
            CONTINUE;
          END IF;
          v_need := CASE WHEN c BETWEEN 194 AND 223 THEN 1 WHEN c BETWEEN 224 AND 239 THEN 2
                         WHEN c BETWEEN 240 AND 244 THEN 3 ELSE 0 END;
          v_lo := CASE c WHEN 224 THEN 160 WHEN 240 THEN 144 ELSE 128 END;
          v_hi := CASE c WHEN 237 THEN 159 WHEN 244 THEN 143 ELSE 191 END;
          k := 0;
          WHILE k < v_need AND i + k + 1 < n LOOP
            d := get_byte(p_bytes, i + k + 1);
            EXIT WHEN d < CASE WHEN k = 0 THEN v_lo ELSE 128 END OR d > CASE WHEN k = 0 THEN v_hi ELSE 191 END;
            k := k + 1;
          END LOOP;
          IF v_need > 0 AND k = v_need THEN
            i := i + v_need + 1;
            CONTINUE;
          END IF;
          -- bytes i .. i + k are a maximal invalid subpart (or a NUL): one U+FFFD
          v_parts := v_parts || convert_from(substring(p_bytes FROM v_start + 1 FOR i - v_start), 'UTF8')
                             || chr(65533);
          i := i + k + 1;
          v_start := i;
        END LOOP;
        v_parts := v_parts || convert_from(substring(p_bytes FROM v_start + 1 FOR n - v_start), 'UTF8');
        RETURN array_to_string(v_parts, '');
    """)
    out = [function("llm_utf8_lossy", "p_bytes BYTEA", "TEXT", lossy, volatility="IMMUTABLE", strict=True,
                    parallel="SAFE", note="UTF-8 bytes to text like Python's bytes.decode('utf-8', 'replace'): one "
                    "U+FFFD per maximal\ninvalid subpart (and per NUL byte, which text cannot hold).")]
    out.append(function("llm_utf8_text", "p_bytes BYTEA", "TEXT", plpgsql("", """
        RETURN convert_from(p_bytes, 'UTF8');
        EXCEPTION WHEN character_not_in_repertoire THEN
          RETURN llm_utf8_lossy(p_bytes);
    """), volatility="IMMUTABLE", strict=True, parallel="SAFE",
        note="Valid UTF-8 (the usual case) is converted directly; anything else goes through llm_utf8_lossy."))
    q = """
        SELECT string_agg(v.token, ''::BYTEA ORDER BY u.o) AS bytes, min(u.o) FILTER (WHERE v.id IS NULL) AS bad
        FROM unnest(p_ids) WITH ORDINALITY AS u(id, o)
        LEFT JOIN llm_bpe_vocab AS v ON v.tokenizer = p_tokenizer AND v.id = u.id"""
    body = plpgsql("r llm_tokenizer; v_bytes BYTEA; v_bad BIGINT;", """
        r := llm_tokenizer_get(p_tokenizer);
        SELECT q.bytes, q.bad INTO v_bytes, v_bad FROM (
          @q
        ) AS q;
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: token id % at position % is not in tokenizer "%" (ids 0 to %)',
            coalesce(p_ids[v_bad]::TEXT, 'NULL'), v_bad, p_tokenizer, r.n_vocab - 1
            USING HINT = 'Decode ids produced by the same tokenizer (llm_encode(text, tokenizer => ...)).';
        END IF;
        RETURN coalesce(v_bytes, ''::BYTEA);
    """, q=q)
    out.append(function("llm_bpe_decode_bytes", "p_ids INT[], p_tokenizer TEXT", "BYTEA", body,
                        volatility="STABLE", strict=True, settings=SETTINGS,
                        note="llm_decode_bytes' body: token bytes in order, an unknown id is an error naming it."))
    out.append(function("llm_decode_bytes", "ids INT[], tokenizer TEXT DEFAULT 'gpt2'", "BYTEA", """
        SELECT llm_bpe_decode_bytes($1, $2)""", language="sql", volatility="STABLE", strict=True,
        note="The exact bytes of a token sequence (what llm_decode reads as UTF-8)."))
    out.append(function("llm_decode", "ids INT[], tokenizer TEXT DEFAULT 'gpt2'", "TEXT", """
        SELECT llm_utf8_text(llm_decode_bytes($1, $2))""", language="sql", volatility="STABLE", strict=True,
        note="Text of a token sequence: llm_decode(llm_encode(x)) = x. Bytes that are not valid UTF-8 on their own\n"
             "(a sequence cut inside a character) decode to U+FFFD as in tiktoken / Python's errors='replace'."))
    return "\n".join(out)


def _helpers() -> str:
    q = """
        SELECT u.o::INT, u.id, v.printable, llm_utf8_lossy(v.token)
        FROM unnest(llm_encode($1, $2)) WITH ORDINALITY AS u(id, o)
        JOIN llm_bpe_vocab AS v ON v.tokenizer = $2 AND v.id = u.id
        ORDER BY u.o"""
    out = [function("llm_tokenize", "text TEXT, tokenizer TEXT DEFAULT 'gpt2'",
                    "TABLE(pos INT, id INT, printable TEXT, piece TEXT)", sql(q) + ";", language="sql",
                    strict=True, settings=SETTINGS,
                    note="One row per token of a text: position, id, GPT-2's printable form and its text.")]
    body = plpgsql("n BIGINT;", """
        @purge;
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN n;
    """, purge="DELETE FROM llm_bpe_cache AS c WHERE llm_bpe_cache_clear.tokenizer IS NULL "
               "OR c.tokenizer = llm_bpe_cache_clear.tokenizer")
    out.append(function("llm_bpe_cache_clear", "tokenizer TEXT DEFAULT NULL", "BIGINT", body,
                        note="Empty the BPE cache (of one tokenizer, or all). Returns the number of pieces dropped."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), _lookup(), _bpe(), _encode(), _decode(), _helpers()])
