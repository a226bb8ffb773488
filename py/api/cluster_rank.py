"""The rank side of a cluster (docs/scaleout.md): what a coordinator calls on every rank through PL/Proxy, and
the per-tile checksums it reads through postgres_fdw. Every pg_llm install has these (a database is a rank
because a coordinator registered it, nothing else marks it), so none of them needs plproxy or postgres_fdw.

A model's durable state is its config, llm_model.step and the tiles of its tensors of roles param, adam_m and
adam_v. Its checksum is built from per-tile md5s (never from the payloads concatenated: GPT-2 small's
parameters and moments are 1.5 GB, beyond a datum's 1 GB): a tensor's checksum is the md5 of its tiles'
"tr,tc:md5" in (tr, tc) order, the model's the md5 of "role name shape tile checksum" lines in byte order
(COLLATE "C", so a coordinator and a rank with other collations agree).

The functions taking p_ranks INT[] are called through PL/Proxy with `SPLIT p_ranks; RUN ON p_ranks`: each
rank receives the one-element array of its own rank number and returns it, so the coordinator knows who
answered. A rank number is PL/Proxy's partition number (clusters are defined with modular_mapping).
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import INTERNAL

SQL_FILE = "api/cluster_rank.sql"
ORDER = 90

STATE = "('param', 'adam_m', 'adam_v')"
MD5_VIEW = f"{INTERNAL}.llm_cluster_tile_md5"
CONFIG_COLS = ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size", "tokenizer", "tied_embeddings",
               "layer_norm_epsilon", "activation", "dropout", "initializer_range")
INFO_COLS = ("rank INT, build TEXT, dbname TEXT, schema TEXT, node TEXT, config JSONB, step BIGINT, "
             "writable BOOLEAN, tensors BIGINT, bytes BIGINT, checksum TEXT, conflict TEXT")
# A tensor's checksum from rows of (tr, tc, md5); a model's from rows of (role, name, shape, tile, checksum).
TENSOR_SUM = "md5(string_agg(s.tr || ',' || s.tc || ':' || s.md5, ';' ORDER BY s.tr, s.tc))"
MODEL_SUM = ("md5(string_agg(x.role || ' ' || x.name || ' ' || x.shape::TEXT || ' ' || x.tile::TEXT || ' ' "
             "|| x.checksum, E'\\n' ORDER BY x.role COLLATE \"C\", x.name COLLATE \"C\"))")


def tensor_sums(source: str, model: str) -> str:
    """Per-tensor (name, role, shape, tile, tiles, bytes, checksum) of `model` from a relation shaped like
    MD5_VIEW (the local view, or a rank's through a foreign table)."""
    return f"""
        SELECT s.name, s.role, s.shape, s.tile, count(*)::BIGINT AS tiles, sum(s.bytes)::BIGINT AS bytes,
               {TENSOR_SUM} AS checksum
        FROM {source} AS s
        WHERE s.model = {model}
        GROUP BY s.name, s.role, s.shape, s.tile"""


def _view() -> str:
    return stmt(f"""
        CREATE VIEW {MD5_VIEW} AS
        SELECT v.model, v.name, v.role, v.shape, v.tile, t.tr, t.tc, length(t.data) AS bytes, md5(t.data) AS md5
        FROM llm_tensor AS v
        JOIN llm_tile AS t ON t.tensor_id = v.id
        WHERE v.id > 0 AND v.role IN {STATE}""",
        "Per-tile md5 of every durable tensor (a coordinator reads a rank's through postgres_fdw, filtered by "
        "model: the filter runs on the rank, so only the model's tiles are hashed).")


def _sums() -> str:
    out = [function("llm_cluster_tensor_sums", "p_model TEXT",
                    "TABLE(name TEXT, role TEXT, shape INT[], tile INT[], tiles BIGINT, bytes BIGINT, checksum TEXT)",
                    tensor_sums(MD5_VIEW, "p_model"), language="sql", volatility="STABLE",
                    note="The checksum of each durable tensor (param, adam_m, adam_v) of a model, from per-tile md5s.")]
    body = f"SELECT count(*)::BIGINT, coalesce(sum(x.bytes), 0)::BIGINT, {MODEL_SUM} " \
           "FROM llm_cluster_tensor_sums(p_model) AS x"
    out.append(function("llm_cluster_model_sum", "p_model TEXT, OUT tensors BIGINT, OUT bytes BIGINT, "
                        "OUT checksum TEXT", "RECORD", body, language="sql", volatility="STABLE",
                        note="A model's durable tensors, their bytes and one checksum over them (NULL: none)."))
    return "\n".join(out)


def _info() -> str:
    conflict = """
        SELECT format('config "%s" of this rank differs from the coordinator''s and is used by model(s) %s',
                      k.name, string_agg(m.name, ', ' ORDER BY m.name))
        FROM llm_model_config AS k
        JOIN llm_model AS m ON m.config = k.name AND m.name <> p_model
        WHERE k.name = p_config ->> 'name'
          AND to_jsonb(k) - 'owner' - 'note' <> p_config - 'owner' - 'note'
        GROUP BY k.name"""
    body = plpgsql("v_config TEXT; c llm_model_config;", """
        rank := p_ranks[1];
        build := llm_build();
        dbname := current_database();
        schema := '@extschema@';
        node := md5(pg_postmaster_start_time()::TEXT || ':' || current_database() || ':'
                    || (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database()));
        v_config := (SELECT m.config FROM llm_model AS m WHERE m.name = p_model);
        IF v_config IS NOT NULL THEN
          SELECT * INTO c FROM llm_model_config AS k WHERE k.name = v_config;
          config := to_jsonb(c) - 'owner' - 'note';
          step := (SELECT m.step FROM llm_model AS m WHERE m.name = p_model);
          writable := p_model IN (SELECT w.name FROM llm_writable_models() AS w);
          IF p_sums THEN
            SELECT s.tensors, s.bytes, s.checksum INTO tensors, bytes, checksum
            FROM llm_cluster_model_sum(p_model) AS s;
          END IF;
        ELSE
          writable := has_table_privilege('llm_model', 'INSERT');
        END IF;
        IF p_config IS NOT NULL THEN
          conflict := (
            @conflict
          );
        END IF;
        RETURN NEXT;
    """, conflict=conflict)
    return function("llm_cluster_rank_info", "p_ranks INT[], p_model TEXT, p_config JSONB DEFAULT NULL, "
                    "p_sums BOOLEAN DEFAULT TRUE",
                    f"TABLE({INFO_COLS})",
                    "#variable_conflict use_column\n" + body, volatility="STABLE",
                    note="What a coordinator asks a rank (through PL/Proxy) before checking or syncing: its pg_llm "
                    "build, schema, an id of this database in this server run (node), and for p_model its config, "
                    "step, whether the caller may write it, its checksum (p_sums), and with p_config (the "
                    "coordinator's) why a sync could not write the config (conflict).")


def _tensor_sums_rank() -> str:
    body = "SELECT p_ranks[1], s.name, s.role, s.checksum FROM llm_cluster_tensor_sums(p_model) AS s"
    return function("llm_cluster_rank_sums", "p_ranks INT[], p_model TEXT",
                    "TABLE(rank INT, name TEXT, role TEXT, checksum TEXT)", body, language="sql",
                    volatility="STABLE", note="Per-tensor checksums of a model on a rank (called through PL/Proxy to "
                    "name the tensors that diverge).")


def _prepare() -> str:
    cols = ", ".join(CONFIG_COLS)
    vals = ", ".join(f"c.{k}" for k in CONFIG_COLS)
    src = "jsonb_to_recordset(p_tensors) AS s(name TEXT, role TEXT, shape INT[], tile INT[])"
    queries = {
        "ins_config": f"INSERT INTO llm_model_config (name, {cols}, note) VALUES (c.name, {vals}, c.note)",
        "upd_config": f"UPDATE llm_model_config AS k SET ({cols}) = ({vals}) WHERE k.name = c.name",
        "ins_model": "INSERT INTO llm_model (name, config) VALUES (p_model, c.name)",
        "rebind": "UPDATE llm_model AS m SET config = c.name WHERE m.name = p_model AND m.config <> c.name",
        "drop_extra": f"""
            DELETE FROM llm_tensor AS d
            WHERE d.model = p_model AND d.role IN {STATE} AND d.id > 0
              AND NOT EXISTS (SELECT 1 FROM {src} WHERE s.name = d.name AND s.role = d.role)""",
        "clear_reshaped": f"""
            DELETE FROM llm_tile AS t USING llm_tensor AS d, {src}
            WHERE t.tensor_id = d.id AND d.model = p_model AND d.id > 0 AND s.name = d.name AND s.role = d.role
              AND (d.shape <> s.shape OR d.tile <> s.tile)""",
        "reshape": f"""
            UPDATE llm_tensor AS d SET shape = s.shape, tile = s.tile FROM {src}
            WHERE d.model = p_model AND d.id > 0 AND s.name = d.name AND s.role = d.role
              AND (d.shape <> s.shape OR d.tile <> s.tile)""",
        "add_missing": f"""
            INSERT INTO llm_tensor (id, model, name, role, shape, tile)
            SELECT nextval('llm_tensor_durable_id'), p_model, s.name, s.role, s.shape, s.tile FROM {src}
            WHERE NOT EXISTS (SELECT 1 FROM llm_tensor AS d WHERE d.model = p_model AND d.name = s.name
                              AND d.role = s.role AND d.id > 0)""",
        "ids": f"""
            SELECT p_ranks[1], d.name, d.role, d.id FROM llm_tensor AS d
            WHERE d.model = p_model AND d.role IN {STATE} AND d.id > 0""",
    }
    body = "#variable_conflict use_column\n" + plpgsql("c llm_model_config; v_old llm_model_config; v_users TEXT;", """
        c := jsonb_populate_record(NULL::llm_model_config, p_config);
        SELECT * INTO v_old FROM llm_model_config AS x WHERE x.name = c.name;
        IF v_old.name IS NULL THEN
          @ins_config;
        ELSIF to_jsonb(v_old) - 'owner' - 'note' <> p_config - 'owner' - 'note' THEN
          v_users := (SELECT string_agg(m.name, ', ') FROM llm_model AS m
                      WHERE m.config = c.name AND m.name <> p_model);
          IF v_users IS NOT NULL THEN
            RAISE EXCEPTION 'pg_llm: config "%" of rank % differs from the coordinator''s and is used by model(s) %',
              c.name, p_ranks[1], v_users
              USING HINT = 'Give the coordinator''s config another name, or drop those models on the rank.';
          END IF;
          @upd_config;
        END IF;
        IF EXISTS (SELECT 1 FROM llm_model AS m WHERE m.name = p_model) THEN
          PERFORM llm_model_writable(p_model, 'llm_cluster_sync');
          @rebind;
        ELSE
          @ins_model;
        END IF;
        @drop_extra;
        @clear_reshaped;
        @reshape;
        @add_missing;
        RETURN QUERY
          @ids;
    """, **queries)
    return function("llm_cluster_rank_prepare", "p_ranks INT[], p_model TEXT, p_config JSONB, p_tensors JSONB",
                    "TABLE(rank INT, name TEXT, role TEXT, id BIGINT)", body,
                    note="A sync's first step on a rank (through PL/Proxy, committed on its own): make the config, "
                    "the model row and its durable tensors' catalog rows (p_tensors: name, role, shape, tile) "
                    "those of the coordinator, and return the rank's tensor ids. Tiles and step follow through "
                    "postgres_fdw in the coordinator's transaction; a tensor whose shape or tile changed loses its "
                    "tiles here.")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _view(), _sums(), _info(), _tensor_sums_rank(), _prepare()])
