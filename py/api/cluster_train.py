"""Data-parallel training over a cluster (docs/scaleout.md, "Data-parallel training"): llm_cluster_train_step
runs one optimizer step of llm_train_step on the ranks of a cluster, atomically, and llm_cluster_recover resolves
what a coordinator that died mid-step left prepared.

A step, from the coordinator, over one dblink connection per rank (api/cluster_train_io.py):
0. Refusals before any rank runs anything: fewer rows than ranks, an unknown
   cluster; then every rank checks (read-only, llm_dp_rank_info) the model, the caller's right to train it, the
   hyperparameters and dataset, and that no unfinished step is prepared there; the ranks must run the
   coordinator's build, be distinct databases and hold the same config, step and (a checksum of every tile,
   skipped when the row versions are those of the caller's last verified state, llm_dp_state) the same
   parameters and moments.
1. Phase 1 on every rank in parallel, each committed on its own: its rows of the global batch, forward and
   backward, gradient tiles into llm_dp_grad (api/cluster_train_rank.py).
2. Phase 2 on every rank in parallel, in a transaction: BEGIN, llm_dp_rank_apply (sum in rank order, AdamW,
   step, log), PREPARE TRANSACTION 'pg_llm:<cluster>:<step>:<rank>:<nonce>:<model>'. Only if every rank
   prepared, with the same checksum of its new parameters and moments, the decision is committed here (through
   the loopback connection, table llm_dp_decision) and COMMIT PREPARED runs on every rank; otherwise ROLLBACK
   PREPARED on those that prepared, and the others' transactions roll back when their connection closes.
"""
from __future__ import annotations

from pg_llm.api.cluster_infer import versions_table
from pg_llm.api.cluster_train_io import CONN, io
from pg_llm.api.train import HYPER
from pg_llm.api.train_resume import DEFAULTS
from pg_llm.config import TrainConfig
from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import INTERNAL, OWNER
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "api/cluster_train.sql"
ORDER = 94  # after api/cluster.sql, api/cluster_train_rank.sql and api/train_space.sql (the loopback)

STEP_NAMES = ("model", "dataset", "batch_size", *TrainConfig.names(), "split")
# the step's own arguments in named notation, every value a literal (format %L)
NAMED = "format('" + ", ".join(f"{n} => %L" for n in STEP_NAMES) + "', " + ", ".join(
    f"llm_dp_train.{n}" for n in STEP_NAMES) + ")"
# llm_cluster_train_step's arguments, passed on to llm_dp_train
PASS = "cluster, model, dataset, batch_size, " + ", ".join(f"{n} => {n}" for n in TrainConfig.names()) + \
    ", split => split"
ARGS = (f"cluster TEXT, model TEXT, dataset TEXT, batch_size INT DEFAULT {DEFAULTS['batch_size']}, {HYPER}, "
        f"split TEXT DEFAULT '{DEFAULTS['split']}'")
RI = f"{INTERNAL}.llm_dp_rank"
LOCK = "pg_try_advisory_xact_lock(hashtext('pg_llm.cluster_train'), hashtext({c}))"
STATE_T = f"{INTERNAL}.llm_dp_state"
DECISION_T = f"{INTERNAL}.llm_dp_decision"
SYNC_HINT = "format('SELECT * FROM llm_cluster_sync(%L, %L) replicates the coordinator''s model to every rank.', " \
            "v_model, v_cluster)"
WHERE = "format('rank %s of cluster \"%s\" (database \"%s\")', v_ranks[i], v_cluster, v_rows[i] ->> 'dbname')"


def _tables() -> str:
    return "\n".join([versions_table(STATE_T, "The ranks' versions (llm_dp_rank_version, rank 0, 1, ...) of a "
                                     "model when the caller last saw them identical: after a full check, or after "
                                     "a step every rank committed with the same checksum. A role trusts its own rows "
                                     "only (row-level security)."),
        stmt(f"""
        CREATE TABLE {DECISION_T} (
          gid TEXT PRIMARY KEY,
          cluster TEXT NOT NULL,
          model TEXT NOT NULL,
          step INT NOT NULL,
          decided_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          {OWNER}
        )""", "A coordinator's commit decision for the prepared transactions of a cluster step, committed before "
              "any rank commits; llm_cluster_recover commits a prepared transaction listed here and rolls back "
              "any other.")])


def _peers() -> str:
    epoch = """
        SELECT md5(string_agg(concat_ws('|', r.rank, r.host, r.port, r.dbname, r.login, r.added_at), ';'
                              ORDER BY r.rank))
        FROM llm_cluster_rank AS r WHERE r.cluster = p_cluster"""
    password = """
        SELECT substr(o.o, 10) FROM pg_user_mappings AS u, unnest(u.umoptions) AS o(o)
        WHERE u.srvname = 'llm_rank_' || p_cluster || '_' || s.rank AND u.usename = current_user
          AND o.o LIKE 'password=%'"""
    body = plpgsql("v_epoch TEXT; v_r INT; v_ok BOOLEAN; s RECORD; v_pw TEXT;", f"""
        IF cardinality(p_ranks) < 2 THEN
          RETURN;
        END IF;
        v_epoch := (
          @epoch
        );
        FOREACH v_r IN ARRAY p_ranks LOOP
          v_ok := (SELECT x.v FROM dblink({CONN.format(r='v_r')}, format('SELECT {RI}_peered(%L, %L, %L, %s)',
                   p_cluster, v_epoch, p_ranks, v_r)) AS x(v BOOLEAN));
          CONTINUE WHEN v_ok;
          FOR s IN SELECT * FROM llm_cluster_rank AS r WHERE r.cluster = p_cluster AND r.rank <> v_r
                   ORDER BY r.rank LOOP
            v_pw := (
              @password
            );
            PERFORM * FROM dblink({CONN.format(r='v_r')}, format('SELECT {RI}_peer(%L, %L, %s, %L, %L, %L, %L, %L)',
                                  p_cluster, v_epoch, s.rank, s.host, s.port, s.dbname, s.login, v_pw)) AS x(v TEXT);
          END LOOP;
        END LOOP;
    """, epoch=epoch, password=password)
    return function("llm_dp_peers", "p_cluster TEXT, p_ranks INT[]", "VOID", body, note="""
        Make sure every rank can read every other rank's gradients: its dblink_fdw servers and user mappings for
        them (llm_dp_rank_peer, the login and password of the caller's mappings here), re-created when the
        cluster's registration changed since (the epoch in their comments).""")


def _check() -> str:
    body = plpgsql("v_nodes TEXT[]; v_cluster TEXT := p_cluster; v_model TEXT := p_model; v_ranks INT[] := p_ranks; "
                   "v_rows JSONB[] := p_rows; v_where TEXT;", f"""
        v_nodes := ARRAY[md5(pg_postmaster_start_time()::TEXT || ':' || current_database() || ':'
                             || (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database()))];
        FOR i IN 1 .. cardinality(v_ranks) LOOP
          v_where := {WHERE};
          IF v_rows[i] ->> 'build' IS DISTINCT FROM llm_build() THEN
            RAISE EXCEPTION 'pg_llm: % runs pg_llm build %, the coordinator runs %', v_where, v_rows[i] ->> 'build',
              llm_build() USING HINT = 'Install the coordinator''s pg_llm on the rank, then sync the model again.';
          END IF;
          IF v_rows[i] ->> 'node' = ANY (v_nodes) THEN
            RAISE EXCEPTION 'pg_llm: % is %', v_where, CASE WHEN v_rows[i] ->> 'node' = v_nodes[1]
              THEN 'the coordinator''s own database' ELSE 'another rank''s database' END
              USING HINT = 'A rank is a database of its own: llm_cluster_drop the cluster and register other '
                           'databases.';
          END IF;
          v_nodes := v_nodes || (v_rows[i] ->> 'node');
          IF v_rows[i] -> 'config' IS DISTINCT FROM v_rows[1] -> 'config' THEN
            RAISE EXCEPTION 'pg_llm: model "%" has another config on % than on rank %', v_model, v_where, v_ranks[1]
              USING HINT = {SYNC_HINT};
          END IF;
          IF v_rows[i] ->> 'step' IS DISTINCT FROM v_rows[1] ->> 'step' THEN
            RAISE EXCEPTION 'pg_llm: model "%" is at step % on %, at step % on rank %', v_model, v_rows[i] ->> 'step',
              v_where, v_rows[1] ->> 'step', v_ranks[1] USING HINT = {SYNC_HINT};
          END IF;
          IF p_sums AND v_rows[i] ->> 'checksum' IS DISTINCT FROM v_rows[1] ->> 'checksum' THEN
            RAISE EXCEPTION 'pg_llm: the parameters of model "%" diverge on % from rank %''s', v_model, v_where,
              v_ranks[1] USING HINT = {SYNC_HINT};
          END IF;
        END LOOP;
    """)
    return function("llm_dp_check", "p_cluster TEXT, p_model TEXT, p_ranks INT[], p_rows JSONB[], p_sums BOOLEAN",
                    "VOID", body, volatility="STABLE", note="""
        Refuse ranks (their llm_dp_rank_info rows) that cannot take one step together: another pg_llm build than
        the coordinator's, the coordinator's or another rank's database, another config or step than rank 0's, or
        (p_sums) other parameters or moments.""")


def _step() -> str:
    info = f"format('SELECT to_jsonb(x) FROM {RI}_info(%L, %s, %L, %s) AS x', v_cluster, r.r, {{sums}}, v_args)"
    grads = f"format('SELECT to_jsonb(x) FROM {RI}_grads(%L, %L, %s, %s, %s, %s) AS x', v_cluster, v_nonce, r.r, " \
            "v_n, v_step, v_args)"
    apply = f"format('SELECT to_jsonb(x) FROM {RI}_apply(%L, %L, %L, %s, %s, %L, %L, %L, %L, %s) AS x', v_cluster, " \
            "v_nonce, v_ranks, r.r, v_step, v_counts, v_loss, v_tokens, v_t0, v_args)"
    version = f"format('SELECT jsonb_build_object(''version'', {RI}_version(%L))', v_model)"
    known = f"""
        SELECT 1 FROM {STATE_T} AS s
        WHERE s.cluster = v_cluster AND s.model = v_model AND s.owner = CURRENT_USER::TEXT::REGROLE
          AND s.versions = ARRAY(SELECT e ->> 'version' FROM unnest(v_rows) AS e)"""
    remember = f"""
        INSERT INTO {STATE_T} (cluster, model, versions)
        VALUES (v_cluster, v_model, ARRAY(SELECT e ->> 'version' FROM unnest(v_rows) AS e))
        ON CONFLICT (cluster, model, owner) DO UPDATE SET versions = excluded.versions, checked_at = now()"""
    body = plpgsql("""
        v_t0 TIMESTAMPTZ := clock_timestamp(); v_cluster TEXT; v_model TEXT; v_ranks INT[]; v_n INT; v_args TEXT;
        v_rows JSONB[]; v_step INT; v_nonce TEXT; v_gids TEXT[]; v_loss FLOAT8 := 0; v_tokens BIGINT := 0;
        v_counts BIGINT[] := '{}'; v_prepared INT := 0; v_decided BOOLEAN := FALSE; v_log JSONB; v_failed TEXT;
        v_out llm_train_log; v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT;
    """, f"""
        v_cluster := llm_dp_train.cluster;
        v_model := llm_dp_train.model;
        PERFORM llm_cluster_require();
        v_ranks := llm_cluster_ranks_of(v_cluster);
        v_n := cardinality(v_ranks);
        IF coalesce(v_model, '') = '' THEN
          RAISE EXCEPTION 'pg_llm: %: model must be named', p_caller USING HINT = 'Pass model => NAME.';
        END IF;
        IF batch_size < v_n THEN
          RAISE EXCEPTION 'pg_llm: %: batch_size % is smaller than the % ranks of cluster "%"', p_caller,
            batch_size, v_n, v_cluster USING HINT = 'Every rank needs at least one row of the batch.';
        END IF;
        IF NOT {LOCK.format(c='v_cluster')} THEN
          RAISE EXCEPTION 'pg_llm: cluster "%" is running a step in another session', v_cluster
            USING HINT = 'One step per cluster at a time.';
        END IF;
        v_args := {NAMED};
        PERFORM llm_dp_open(v_cluster, v_ranks, p_keep);
        BEGIN
          v_rows := llm_dp_gather(v_cluster, v_ranks, ARRAY(SELECT {info.format(sums='FALSE')} FROM unnest(v_ranks)
                                                              AS r(r)));
          PERFORM llm_dp_check(v_cluster, v_model, v_ranks, v_rows, FALSE);
          IF NOT EXISTS (
            @known
          ) THEN  -- a change since the caller last saw the ranks identical: compare every tile's checksum
            v_rows := llm_dp_gather(v_cluster, v_ranks, ARRAY(SELECT {info.format(sums='TRUE')} FROM unnest(v_ranks)
                                                                AS r(r)));
            PERFORM llm_dp_check(v_cluster, v_model, v_ranks, v_rows, TRUE);
            @remember;
          END IF;
          v_step := (v_rows[1] ->> 'step')::INT + 1;
          v_nonce := md5(random()::TEXT || clock_timestamp()::TEXT || pg_backend_pid()::TEXT);
          v_gids := ARRAY(SELECT format('pg_llm:%s:%s:%s:%s:%s', v_cluster, v_step, u.r, left(v_nonce, 12), v_model)
                          FROM unnest(v_ranks) AS u(r));
          IF (SELECT max(octet_length(g)) FROM unnest(v_gids) AS g) >= 200 THEN
            RAISE EXCEPTION 'pg_llm: %: model name "%" is too long for a transaction id', p_caller, v_model
              USING HINT = 'Prepared transaction ids hold up to 199 bytes: use a shorter model name.';
          END IF;
          PERFORM llm_dp_peers(v_cluster, v_ranks);
          -- ---- phase 1: each rank's gradients, committed there ----
          v_rows := llm_dp_gather(v_cluster, v_ranks, ARRAY(SELECT {grads} FROM unnest(v_ranks) AS r(r)));
          IF (SELECT count(DISTINCT e ->> 'batch') FROM unnest(v_rows) AS e) <> 1 THEN
            RAISE EXCEPTION 'pg_llm: the ranks of cluster "%" drew different rows for step % of dataset "%"', v_cluster,
              v_step, dataset USING HINT = 'Every rank needs the same dataset, row ids included: load it with the '
                                           'same command into each rank (docs/scaleout.md).';
          END IF;
          FOR i IN 1 .. v_n LOOP
            v_loss := v_loss + (v_rows[i] ->> 'loss')::FLOAT8;
            v_tokens := v_tokens + (v_rows[i] ->> 'tokens')::BIGINT;
            v_counts := v_counts || (v_rows[i] ->> 'tiles')::BIGINT;
          END LOOP;
          -- ---- phase 2: sums, AdamW, step and log on every rank, prepared ----
          PERFORM llm_dp_exec(v_cluster, u.r, 'BEGIN') FROM unnest(v_ranks) AS u(r);
          v_rows := llm_dp_gather(v_cluster, v_ranks, ARRAY(SELECT {apply} FROM unnest(v_ranks) AS r(r)));
          IF (SELECT count(DISTINCT e ->> 'checksum') FROM unnest(v_rows) AS e) <> 1 THEN
            RAISE EXCEPTION 'pg_llm: the ranks of cluster "%" computed different parameters in step % of model "%"',
              v_cluster, v_step, v_model USING HINT = 'Nothing was committed. The ranks'' numpy builds may round '
                                                      'differently: install the same on every node.';
          END IF;
          v_log := v_rows[1] -> 'log';
          FOR i IN 1 .. v_n LOOP
            PERFORM llm_dp_exec(v_cluster, v_ranks[i], format('PREPARE TRANSACTION %L', v_gids[i]));
            v_prepared := i;
          END LOOP;
          PERFORM llm_dp_decide(v_cluster, v_model, v_step, v_gids);
          v_decided := TRUE;
          FOR i IN 1 .. v_n LOOP
            BEGIN
              PERFORM dblink_exec({CONN.format(r='v_ranks[i]')}, format('COMMIT PREPARED %L', v_gids[i]));
            EXCEPTION WHEN OTHERS THEN
              v_failed := concat_ws(', ', v_failed, format('rank %s (%s)', v_ranks[i], SQLERRM));
            END;
          END LOOP;
          IF v_failed IS NOT NULL THEN
            RAISE WARNING 'pg_llm: step % of model "%" is committed, but COMMIT PREPARED failed on %', v_step, v_model,
              v_failed USING HINT = format('SELECT * FROM llm_cluster_recover(%L) commits it there once the rank is '
                                           'back.', v_cluster);
          ELSE
            DELETE FROM {DECISION_T} AS d WHERE d.gid = ANY (v_gids);
            v_rows := llm_dp_gather(v_cluster, v_ranks, ARRAY(SELECT {version} FROM unnest(v_ranks) AS r(r)));
            @remember;
          END IF;
        EXCEPTION WHEN OTHERS OR query_canceled THEN
          GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
            v_state = RETURNED_SQLSTATE;
          IF NOT v_decided THEN
            FOR i IN 1 .. v_prepared LOOP
              BEGIN
                PERFORM dblink_exec({CONN.format(r='v_ranks[i]')}, format('ROLLBACK PREPARED %L', v_gids[i]));
              EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pg_llm: could not roll back % on rank %: %', v_gids[i], v_ranks[i], SQLERRM
                  USING HINT = format('SELECT * FROM llm_cluster_recover(%L) rolls it back.', v_cluster);
              END;
            END LOOP;
          END IF;
          PERFORM llm_dp_close(v_ranks);
          IF v_decided THEN  -- committed everywhere: report, do not fail the step
            RAISE WARNING 'pg_llm: step % of model "%" committed on cluster "%", then: %', v_step, v_model, v_cluster,
              v_msg;
          ELSE
            PERFORM llm_reraise(v_msg, v_detail, v_hint, v_state);
          END IF;
        END;
        IF NOT p_keep THEN  -- a loop keeps them for its next step (llm_dp_open p_reuse), and closes them at its end
          PERFORM llm_dp_close(v_ranks);
        END IF;
        v_out := jsonb_populate_record(NULL::llm_train_log, v_log);
        v_out.seconds := extract(EPOCH FROM clock_timestamp() - v_t0);
        RETURN v_out;
    """, known=known, remember=remember)
    out = [function("llm_dp_train", f"{ARGS}, p_keep BOOLEAN DEFAULT FALSE, "
                    "p_caller TEXT DEFAULT 'llm_cluster_train_step'", "llm_train_log",
                    "#variable_conflict use_column\n" + body, settings=KERNEL_SETTINGS, note="""
        llm_cluster_train_step's body; p_keep: leave the connections to the ranks open after a step that committed
        (CALL llm_cluster_train_run's next step reuses them; any failure closes them), p_caller: who to name in
        errors.""")]
    out.append(function("llm_cluster_train_step", ARGS, "llm_train_log", plpgsql("", f"""
        RETURN llm_dp_train({PASS});
    """), settings=KERNEL_SETTINGS, note="""
        One optimizer step of llm_train_step(model, dataset, batch_size, ...) on every rank of a cluster: each rank
        runs forward and backward on its share of the step's global batch, the gradients are summed on every rank
        in rank order and every rank applies the same AdamW update; the step commits on every rank or on none
        (two-phase commit). Returns the step's llm_train_log row (loss of the global batch). Dropout masks are
        those of the global batch's rows (a rank's rows get the single-node step's masks); with grad_accum > 1
        each rank takes its rows of every micro-batch."""))
    return "\n".join(out)


def _recover() -> str:
    listing = ("format('SELECT x.gid FROM pg_catalog.pg_prepared_xacts AS x WHERE x.database = "
               "pg_catalog.current_database() AND pg_catalog.starts_with(x.gid, %L)', 'pg_llm:' || v_cluster || ':')")
    body = plpgsql("v_cluster TEXT; v_ranks INT[]; v_r INT; v_gid TEXT;", f"""
        v_cluster := llm_cluster_recover.cluster;
        PERFORM llm_cluster_require();
        v_ranks := llm_cluster_ranks_of(v_cluster);
        IF NOT {LOCK.format(c='v_cluster')} THEN
          RAISE EXCEPTION 'pg_llm: cluster "%" is running a step in another session', v_cluster
            USING HINT = 'Its coordinator resolves its own prepared transactions: recover after it returns.';
        END IF;
        PERFORM llm_dp_open(v_cluster, v_ranks);
        FOREACH v_r IN ARRAY v_ranks LOOP
          FOR v_gid IN SELECT x.gid FROM dblink({CONN.format(r='v_r')}, {listing}) AS x(gid TEXT) ORDER BY 1 LOOP
            rank := v_r;
            gid := v_gid;
            IF EXISTS (SELECT 1 FROM {DECISION_T} AS d WHERE d.gid = v_gid) THEN
              PERFORM dblink_exec({CONN.format(r='v_r')}, format('COMMIT PREPARED %L', v_gid));
              action := 'committed';
            ELSE
              PERFORM dblink_exec({CONN.format(r='v_r')}, format('ROLLBACK PREPARED %L', v_gid));
              action := 'rolled back';
            END IF;
            RETURN NEXT;
          END LOOP;
        END LOOP;
        PERFORM llm_dp_close(v_ranks);
        DELETE FROM {DECISION_T} AS d WHERE d.cluster = v_cluster;  -- nothing of this cluster is prepared any more
    """)
    return function("llm_cluster_recover", "cluster TEXT", "TABLE(rank INT, gid TEXT, action TEXT)",
                    "#variable_conflict use_column\n" + body, note="""
        Resolve the prepared transactions a cluster step left on the ranks of cluster `cluster` (its coordinator
        died, or a rank was unreachable, between PREPARE and COMMIT PREPARED): COMMIT PREPARED those the coordinator
        had decided to commit (llm_dp_decision), ROLLBACK PREPARED the others; a row per transaction resolved.""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), io(), _peers(), _check(), _step(), _recover()])
