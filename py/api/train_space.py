"""Disk space during long training runs.

Every step rewrites each parameter and both AdamW moments (12 bytes per parameter: 1.5 GB for GPT-2 small)
and throws away its scratch tiles. Those old row versions are garbage VACUUM can reclaim only once no
snapshot older than them is alive. The CALL form of the loop commits after every step and then vacuums the
tile partitions through its loopback connection, so disk use stays flat. The SELECT form cannot: a SELECT
holds one snapshot for its whole run (measured: backend_xmin fixed, "dead but not yet removable" growing
every step), so its garbage stays until it returns. Both forms measure how much free disk each step took
and stop cleanly, with a warning that says how to go on, before the next step could fill the disk (a full
pg_wal disk makes PostgreSQL PANIC). The SELECT form expects its largest step so far again; the CALL form
its last one: after a VACUUM a step reuses the pages the previous one freed (GPT-2 small with 8 x 1024
tokens wrote 28 GB in its first step with the per-op chain, then about nothing), so the first step's growth
would stop it at once.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql
from pg_llm.ops.gpt2_block import FUSED_TRAIN

SQL_FILE = "api/train_space.sql"
ORDER = 86

MIN_FREE_DEFAULT = "1GB"


def _disk_free() -> str:
    return function("llm_disk_free", "", "BIGINT", """
        import os
        s = os.statvfs('.')  # a backend's working directory is the data directory
        return s.f_bavail * s.f_frsize""", language="plpython3u",
        note="Bytes free for PostgreSQL on the disk holding the data directory (os.statvfs).")


def _min_free() -> str:
    return function("llm_min_free_disk", "", "BIGINT", f"""
        SELECT pg_size_bytes(coalesce(nullif(current_setting('pg_llm.min_free_disk', TRUE), ''),
                                      '{MIN_FREE_DEFAULT}'))""",
                    language="sql", volatility="STABLE",
                    note=f"pg_llm.min_free_disk in bytes (default {MIN_FREE_DEFAULT}): what training leaves free.")


def _room() -> str:
    body = plpgsql("v_min BIGINT;", """
        v_min := llm_min_free_disk();
        IF p_free - p_growth >= v_min THEN
          RETURN NULL;
        END IF;
        RETURN format('pg_llm: %s stopped before step %s: %s free on the data directory''s disk, one step took up '
          'to %s, and pg_llm.min_free_disk keeps %s free', p_loop, p_step + 1, pg_size_pretty(p_free),
          pg_size_pretty(p_growth), pg_size_pretty(v_min));
    """)
    return function("llm_train_room", "p_loop TEXT, p_step BIGINT, p_free BIGINT, p_growth BIGINT", "TEXT", body,
                    note=f"""NULL when one more step of p_growth bytes leaves pg_llm.min_free_disk (default
                    {MIN_FREE_DEFAULT}) free on the data directory's disk; else the reason to stop.""")


# Disk a step takes, fitted to measured growth of the tile partitions. The fused path (default): per micro-batch
# about 1.1 floats per token, channel and (layer + 5) (each block's input; the input, the head's and the first
# block's dx; the parameter gradients stay in memory: ops/held.py), plus the 12 bytes per parameter of the new
# parameter and moment versions; GPT-2 small, 8 x 1024 tokens: 0.47 GB of scratch estimated. The
# per-op chain (pg_llm.fused_train = off; 2 and 4 layers, 128 and 256 wide, 512 to 2048 tokens per step): about
# 2.2 floats per token and vocabulary entry (logits, their gradient) and 45 per token, layer and channel, plus 1.4
# per parameter; GPT-2 small, 2 x 1024 tokens: 5.0 GB of scratch estimated, 4.7 GB measured.
def _estimate() -> str:
    durable = function("llm_step_durable_bytes", "p_model TEXT", "BIGINT", """
        SELECT 12 * coalesce(sum(llm_rows(v.shape)::INT8 * llm_cols(v.shape)), 0)
        FROM llm_tensor AS v WHERE v.model = p_model AND v.role = 'param' AND v.id > 0""", language="sql",
        volatility="STABLE", note="""
        Bytes of tiles every training step of model p_model rewrites: the new parameters and both AdamW moments,
        12 bytes per parameter (also what shared_buffers must hold twice, llm_doctor()).""")
    est = function("llm_train_step_bytes", "p_model TEXT, p_tokens BIGINT, p_grad_accum INT", "BIGINT", f"""
        SELECT (CASE WHEN {FUSED_TRAIN}
                THEN 4.4 * p_grad_accum * p_tokens * c.n_embd * (c.n_layer + 5)
                ELSE 4 * (p_grad_accum * (2.2 * p_tokens * c.vocab_size + 45.0 * p_tokens * c.n_layer * c.n_embd)
                          + 1.4 * (s.durable / 12)) END + s.durable)::BIGINT  -- durable / 12: the parameters
        FROM llm_model AS m JOIN llm_model_config AS c ON c.name = m.config
        CROSS JOIN LATERAL (SELECT llm_step_durable_bytes(m.name) AS durable) AS s
        WHERE m.name = p_model""", language="sql", volatility="STABLE",
        note="About how many bytes of disk one training step of p_tokens tokens per micro-batch writes.")
    need = function("llm_train_step_need", "p_model TEXT, p_dataset TEXT, p_batch_size INT, p_grad_accum INT",
                    "BIGINT", """
        SELECT llm_train_step_bytes(p_model, p_batch_size::BIGINT * coalesce(max(s.block_size), 1), p_grad_accum)
        FROM llm_dataset_source AS s WHERE s.dataset = p_dataset""", language="sql", volatility="STABLE",
        note="llm_train_step_bytes of a step of batch_size windows of a dataset (its block size).")
    body = plpgsql("v_t INT; v_need BIGINT; v_cap BIGINT; v_free BIGINT; v_min BIGINT;", """
        v_t := (SELECT max(s.block_size) FROM llm_dataset_source AS s WHERE s.dataset = p_dataset);
        v_need := llm_train_step_bytes(p_model, p_batch_size::BIGINT * coalesce(v_t, 1), p_grad_accum);
        v_cap := pg_size_bytes(nullif(current_setting('pg_llm.max_step_disk', TRUE), ''));
        IF v_need > v_cap THEN
          RAISE EXCEPTION 'pg_llm: %: a step of % x % tokens writes about % of disk, more than '
            'pg_llm.max_step_disk (%)', p_caller, p_batch_size * p_grad_accum, v_t, pg_size_pretty(v_need),
            pg_size_pretty(v_cap)
            USING HINT = 'Lower batch_size, or raise pg_llm.max_step_disk (SET pg_llm.max_step_disk = ''32GB'').';
        END IF;
        v_free := llm_disk_free();
        v_min := llm_min_free_disk();
        IF v_free - v_need < v_min THEN
          RAISE EXCEPTION 'pg_llm: %: a step of % x % tokens writes about % of disk; % is free and '
            'pg_llm.min_free_disk keeps %', p_caller, p_batch_size * p_grad_accum, v_t, pg_size_pretty(v_need),
            pg_size_pretty(v_free), pg_size_pretty(v_min)
            USING HINT = 'Lower batch_size, or free disk space (or lower pg_llm.min_free_disk).';
        END IF;
    """)
    check = function("llm_train_disk_check", "p_caller TEXT, p_model TEXT, p_dataset TEXT, p_batch_size INT, "
                     "p_grad_accum INT", "VOID", body,
                     note="Refuse a step before it starts when its estimated disk (llm_train_step_bytes) exceeds "
                          "pg_llm.max_step_disk or would leave less than pg_llm.min_free_disk free.")
    return "\n".join([durable, est, need, check])


def _loopback() -> str:
    # conninfo values in single quotes with \ and ' escaped, so a role or database name is always one value
    quote = plpgsql("", r"""
        RETURN '''' || replace(replace(p_value, '\', '\\'), '''', '\''') || '''';
    """)
    out = [function("llm_conninfo_quote", "p_value TEXT", "TEXT", quote, volatility="IMMUTABLE", strict=True,
                    note="A libpq conninfo value, quoted: any role, database or path is one value, never keywords.")]
    body = plpgsql("v_info TEXT; v_socket TEXT;", """
        IF p_conn = ANY(coalesce(dblink_get_connections(), '{}')) THEN
          PERFORM dblink_disconnect(p_conn);  -- left open by a cancelled earlier call in this session
        END IF;
        BEGIN
          v_socket := nullif(split_part(current_setting('unix_socket_directories'), ',', 1), '');
        EXCEPTION WHEN insufficient_privilege THEN  -- pg_read_all_settings only: libpq's default socket then
          v_socket := NULL;
        END;
        v_info := coalesce(current_setting('pg_llm.loopback', TRUE), '')
          || ' dbname=' || llm_conninfo_quote(current_database())
          || ' port=' || llm_conninfo_quote(current_setting('port'))
          || ' user=' || llm_conninfo_quote(current_user)
          || coalesce(' host=' || llm_conninfo_quote(v_socket), '');
        IF has_function_privilege('dblink_connect_u(text, text)', 'EXECUTE') THEN
          PERFORM dblink_connect_u(p_conn, v_info);
        ELSE
          BEGIN  -- an ordinary role: dblink insists that the server asked for its password, and got it
            PERFORM dblink_connect(p_conn, v_info);
          EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'pg_llm: role % cannot open the loopback connection a SELECT training loop needs: %',
              current_user, SQLERRM
              USING HINT = 'CALL llm_train_run(...) trains without one (the same arguments, a commit per step). '
                'Or, where the server asks for passwords, SET pg_llm.loopback = ''password=...'' (docs/access.md).';
          END;
        END IF;
        -- the loopback session resolves names as pg_llm's functions do, whatever the role's default path
        PERFORM dblink_exec(p_conn, 'SET search_path = ' || current_setting('search_path'));  -- ours, pinned
        -- and stops its statement within a second of its caller's end (pg_terminate_backend, a crash)
        PERFORM dblink_exec(p_conn, 'SET client_connection_check_interval = 1000');
    """)
    out.append(function("llm_loopback_connect", "p_conn TEXT", "VOID", body,
                        note="""Open the named dblink connection to this database as this user (set pg_llm.loopback
                        to extra conninfo, e.g. a password, if the server needs it)."""))
    body = plpgsql("v TEXT;", """
        PERFORM dblink_send_query(p_conn, p_sql);
        BEGIN
          WHILE dblink_is_busy(p_conn) = 1 LOOP
            PERFORM pg_sleep(0.005);  -- where a cancel or statement_timeout of the caller lands
          END LOOP;
        EXCEPTION WHEN query_canceled THEN
          PERFORM dblink_cancel_query(p_conn);  -- the loopback statement stops too, at its next interrupt check
          FOR i IN 1 .. 6000 LOOP  -- and has ended (up to 30 s) when this returns: its locks are free again
            EXIT WHEN dblink_is_busy(p_conn) = 0;
            PERFORM pg_sleep(0.005);
          END LOOP;
          RAISE;
        END;
        v := (SELECT x.v FROM dblink_get_result(p_conn, p_fail) AS x(v TEXT) LIMIT 1);
        PERFORM * FROM dblink_get_result(p_conn, FALSE) AS x(v TEXT);  -- the end of its results
        RETURN v;
    """)
    out.append(function("llm_loopback_run", "p_conn TEXT, p_sql TEXT, p_fail BOOLEAN DEFAULT TRUE", "TEXT", body,
                        note="""Run one statement on the loopback connection p_conn and return the first column of
                        its first row as text (a command: its status). Interruptible: the caller's cancel or
                        statement_timeout cancels the loopback statement as well (a plain dblink call waits
                        for it) and returns once it has ended (at most 30 s later). p_fail FALSE: a failed
                        statement returns NULL (with a WARNING)."""))
    body = plpgsql("", """
        IF p_conn IS NOT NULL THEN  -- a failed VACUUM (e.g. not the tables' owner) must not stop training
          PERFORM llm_loopback_run(p_conn, 'VACUUM llm_tile_durable, llm_tile_scratch', FALSE);
        END IF;
    """)
    out.append(function("llm_loopback_vacuum", "p_conn TEXT", "VOID", body,
                        note="VACUUM the tile partitions through the loopback connection p_conn (NULL: nothing)."))
    body = plpgsql("", """
        IF p_conn IS NOT NULL THEN
          PERFORM dblink_disconnect(p_conn);
        END IF;
    """)
    out.append(function("llm_loopback_close", "p_conn TEXT", "VOID", body,
                        note="Close the loopback connection p_conn (NULL: nothing)."))
    return "\n".join(out)


def _pinned_notice() -> str:
    body = plpgsql("v_bytes FLOAT8;", """
        v_bytes := llm_step_durable_bytes(p_model);
        IF v_bytes * greatest(p_steps - p_step, 0) > pg_size_bytes('1GB') THEN
          RAISE NOTICE 'pg_llm: a SELECT holds one snapshot until it returns, so the % of parameters and AdamW '
            'moments each step rewrites (and its scratch tiles) stay on disk until then; it stops before the disk '
            'fills. For long runs use CALL llm_train_run(...) with the same arguments: it reclaims them after '
            'every step.', pg_size_pretty(v_bytes::INT8);
        END IF;
    """)
    return function("llm_train_pinned_notice", "p_model TEXT, p_step BIGINT, p_steps BIGINT", "VOID", body,
                    note="Tell a SELECT llm_train caller what its snapshot keeps on disk when that is over 1 GB.")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _disk_free(), _min_free(), _room(), _estimate(), _loopback(),
                      _pinned_notice()])
