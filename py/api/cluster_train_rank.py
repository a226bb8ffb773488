"""Data-parallel training, the rank side (docs/scaleout.md, "Data-parallel training"): what a coordinator's
llm_cluster_train_step (api/cluster_train.py) runs on every rank, through dblink. Every install has these (a
database is a rank because a coordinator registered it).

- llm_dp_rank_info: the checks before a step (read-only): the model, the caller's right to train it, the
  hyperparameters and dataset (llm_train_check), no unfinished step's prepared transaction, and a version (the
  row versions of the model's parameters and moments; a checksum of them on request).
- llm_dp_rank_peered / llm_dp_rank_peer: the dblink_fdw servers (and user mappings) through which this rank
  reads the other ranks' gradients, created from the coordinator's registration (a COMMENT records which).
- Phase 1, llm_dp_rank_grads (committed on its own): forward + backward on rows [floor(r B / n), floor((r + 1)
  B / n)) of llm_train_batch(dataset, split, B, seed, step, 1), the loss scaled by rows_r / B, and the gradient
  tiles written into llm_dp_grad (unlogged) under the step's nonce. postgres_fdw and dblink see committed rows
  only, hence this commit.
- Phase 2, llm_dp_rank_apply (in the transaction the coordinator then PREPAREs): the sum of every rank's
  tiles in rank order (kernels/dp.py: the same float32 sums on every rank), the global norm, clip, lr and
  AdamW exactly as llm_train_step, the step and the llm_train_log row, the rank's own tiles deleted, and the
  checksum of the new parameters and moments (the coordinator commits only if every rank's is the same).
"""
from __future__ import annotations

from pg_llm.api.cluster_infer import row_versions
from pg_llm.api.cluster_rank import STATE
from pg_llm.api.train import HYPER, check_call
from pg_llm.api.train_resume import DEFAULTS, schedule_of
from pg_llm.gen.emit import comment, function, kernel_body, plpgsql, stmt
from pg_llm.gen.sqlfmt import raw_ddl
from pg_llm.gen.surface import INTERNAL
from pg_llm.kernels.dp import dp_sum_kernel
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "api/cluster_train_rank.sql"
ORDER = 93  # after api/train.sql and api/cluster_rank.sql

GRAD = f"{INTERNAL}.llm_dp_grad"
# the arguments every rank function shares with llm_train_step (so llm_train_check and the schedule read them)
STEP_ARGS = (f"model TEXT, dataset TEXT, batch_size INT DEFAULT {DEFAULTS['batch_size']}, {HYPER}, "
             f"split TEXT DEFAULT '{DEFAULTS['split']}'")
PEER = "'llm_peer_' || p_cluster || '_' || {r}"  # this rank's dblink_fdw server of rank r
DBLINK_SCHEMA = ("(SELECT n.nspname::TEXT FROM pg_extension AS e JOIN pg_namespace AS n ON n.oid = e.extnamespace "
                 "WHERE e.extname = 'dblink')")


def version_sql(model: str) -> str:
    """md5 of the build, step, config and the row versions (ctid, xmin) of a model's parameters and moments
    (tensor rows and tiles): any write of them changes it (api/cluster_infer.py explains why)."""
    return f"""
        SELECT md5(concat_ws(E'\\n', llm_build(), m.step::TEXT, (to_jsonb(k) - 'owner' - 'note')::TEXT,
                             ({row_versions("m.name", f"v.role IN {STATE}")})))
        FROM llm_model AS m JOIN llm_model_config AS k ON k.name = m.config
        WHERE m.name = {model}"""


def _table() -> str:
    return "\n".join([stmt(f"""
        CREATE UNLOGGED TABLE {GRAD} (
          cluster TEXT NOT NULL,
          model TEXT NOT NULL,
          rank INT NOT NULL,
          nonce TEXT NOT NULL,
          step INT NOT NULL,
          name TEXT NOT NULL,
          tr INT NOT NULL,
          tc INT NOT NULL,
          data BYTEA NOT NULL,
          PRIMARY KEY (cluster, model, rank, nonce, name, tr, tc)
        )""", "A rank's share of a cluster step's parameter gradients (phase 1 commits it, the other ranks read it "
              "through dblink in phase 2, whose commit deletes it): unlogged, a crash empties it (the step is "
              "then retried from phase 1)."),
        raw_ddl(f"ALTER TABLE {GRAD} ALTER COLUMN data SET STORAGE EXTERNAL") + ";\n"])


def _info() -> str:
    prepared = """
        SELECT string_agg(x.gid, ', ' ORDER BY x.gid) FROM pg_prepared_xacts AS x
        WHERE x.database = current_database() AND starts_with(x.gid, 'pg_llm:' || p_cluster || ':')"""
    body = plpgsql("c llm_model_config; v_gids TEXT;", f"""
        rank := p_rank;
        build := llm_build();
        dbname := current_database();
        node := md5(pg_postmaster_start_time()::TEXT || ':' || current_database() || ':'
                    || (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database()));
        IF NOT EXISTS (SELECT 1 FROM llm_model AS m WHERE m.name = llm_dp_rank_info.model) THEN
          RAISE EXCEPTION 'pg_llm: rank % of cluster "%" (database "%") has no model "%"', p_rank, p_cluster,
            current_database(), model
            USING HINT = format('SELECT * FROM llm_cluster_sync(%L, %L) on the coordinator replicates it to every '
                                'rank.', model, p_cluster);
        END IF;
        c := llm_model_get(model);
        PERFORM llm_model_writable(model, 'llm_cluster_train_step');
        v_gids := (
          @prepared
        );
        IF v_gids IS NOT NULL THEN  -- before llm_train_guard: a prepared step holds the model's training lock
          RAISE EXCEPTION 'pg_llm: rank % of cluster "%" (database "%") holds the prepared transaction(s) % of an '
            'unfinished cluster step', p_rank, p_cluster, current_database(), v_gids
            USING HINT = format('SELECT * FROM llm_cluster_recover(%L) on the coordinator commits or rolls them back, '
                                'as the coordinator decided.', p_cluster);
        END IF;
        PERFORM llm_train_guard(model);
        PERFORM {check_call("llm_cluster_train_step")};
        config := to_jsonb(c) - 'owner' - 'note';
        step := (SELECT m.step FROM llm_model AS m WHERE m.name = llm_dp_rank_info.model);
        version := llm_dp_rank_version(model);
        IF p_sums THEN
          checksum := (SELECT s.checksum FROM llm_cluster_model_sum(model) AS s);
        END IF;
        RETURN NEXT;
    """, prepared=prepared)
    out = [function("llm_dp_rank_info", f"p_cluster TEXT, p_rank INT, p_sums BOOLEAN, {STEP_ARGS}",
                    "TABLE(rank INT, build TEXT, dbname TEXT, node TEXT, config JSONB, step BIGINT, version TEXT, "
                    "checksum TEXT)", "#variable_conflict use_column\n" + body, volatility="VOLATILE", note="""
        Before a cluster step (read-only): refuses a missing model, a role that may not train it, another session
        training it, bad hyperparameters or dataset, a prepared transaction of an unfinished step; returns the
        build, the database's identity (node), config, step, version (version_sql) and with p_sums the checksum
        of the parameters and moments.""")]
    out.append(function("llm_dp_rank_version", "p_model TEXT", "TEXT", plpgsql("", """
        RETURN (
          @version
        );
    """, version=version_sql("p_model")), volatility="STABLE",
        note="The version of a model's parameters and moments here (version_sql), after a committed step."))
    out.append(function("llm_dp_rank_resume", "p_model TEXT", "TABLE(step BIGINT, schedule JSONB)", """
        SELECT m.step, (SELECT l.schedule FROM llm_train_log AS l WHERE l.model = p_model ORDER BY l.step DESC LIMIT 1)
        FROM llm_model AS m WHERE m.name = p_model""", language="sql", volatility="STABLE", note="""
        Where a cluster loop resumes: the model's step here and the schedule its last step logged (no row: no such
        model)."""))
    out.append(function("llm_dp_rank_vacuum_sql", "", "TEXT", """
        SELECT 'VACUUM ' || string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY c.relname)
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE c.oid IN ('llm_tile_durable'::REGCLASS, 'llm_tile_scratch'::REGCLASS, '{GRAD}'::REGCLASS)""".replace(
        "{GRAD}", GRAD), language="sql", volatility="STABLE", note="""
        The VACUUM a cluster loop runs on this rank after each committed step (what the step rewrote: the tile
        partitions and llm_dp_grad), its names schema-qualified: the coordinator's session here has no pg_llm
        schema in its search_path."""))
    return "\n".join(out)


def _peers() -> str:
    peered = f"""
        SELECT count(*) FROM pg_foreign_server AS s
        JOIN pg_user_mappings AS u ON u.srvid = s.oid AND u.usename = current_user
        WHERE s.srvname = ANY (ARRAY(SELECT {PEER.format(r='x.r')} FROM unnest(p_ranks) AS x(r) WHERE x.r <> p_rank))
          AND obj_description(s.oid, 'pg_foreign_server') = 'pg_llm peer ' || p_epoch"""
    out = [function("llm_dp_rank_peered", "p_cluster TEXT, p_epoch TEXT, p_ranks INT[], p_rank INT", "BOOLEAN",
                    plpgsql("", """
        RETURN (
          @peered
        ) = cardinality(p_ranks) - 1;
    """, peered=peered), volatility="STABLE", note="""
        Whether this rank (p_rank) has a dblink_fdw server and user mapping for every other rank of the cluster, as
        registered on the coordinator at p_epoch (the COMMENT of each server).""")]
    body = plpgsql("v_srv TEXT; v_opts TEXT;", f"""
        v_srv := {PEER.format(r='p_peer')};
        EXECUTE format('DROP SERVER IF EXISTS %I CASCADE', v_srv);
        v_opts := concat_ws(', ', CASE WHEN p_host IS NOT NULL THEN format('host %L', p_host) END,
                            CASE WHEN p_port IS NOT NULL THEN format('port %L', p_port::TEXT) END,
                            format('dbname %L', p_dbname));
        EXECUTE format('CREATE SERVER %I FOREIGN DATA WRAPPER dblink_fdw OPTIONS (%s)', v_srv, v_opts);
        v_opts := format('user %L', p_user)
          || CASE WHEN p_password IS NULL THEN '' ELSE format(', password %L', p_password) END;
        EXECUTE format('CREATE USER MAPPING FOR CURRENT_USER SERVER %I OPTIONS (%s)', v_srv, v_opts);
        EXECUTE format('COMMENT ON SERVER %I IS %L', v_srv, 'pg_llm peer ' || p_epoch);
    """)
    out.append(function("llm_dp_rank_peer", "p_cluster TEXT, p_epoch TEXT, p_peer INT, p_host TEXT, p_port INT, "
                        "p_dbname TEXT, p_user TEXT, p_password TEXT", "VOID", body, note="""
        (Re)create this rank's dblink_fdw server llm_peer_<cluster>_<peer> and the current role's user mapping for
        it (login and password of the coordinator's mapping), through which phase 2 reads that rank's gradients."""))
    return "\n".join(out)


def _grads() -> str:
    body = plpgsql("""
        v_step INT; v_tape BIGINT; v_lo INT; v_hi INT; mb RECORD; v_sums TEXT[] := '{}'; v_loss FLOAT8;
        v_g BIGINT; v_n BIGINT; p RECORD; v_ntok BIGINT := 0;
    """, f"""
        PERFORM llm_model_get(model);
        PERFORM llm_model_writable(model, 'llm_cluster_train_step');
        PERFORM llm_train_guard(model);
        PERFORM llm_train_disk_check('llm_cluster_train_step', model, dataset, batch_size, grad_accum);
        v_step := (SELECT m.step FROM llm_model AS m WHERE m.name = llm_dp_rank_grads.model) + 1;
        IF v_step <> p_step THEN
          RAISE EXCEPTION 'pg_llm: model "%" is at step % on rank % of cluster "%", the step is %', model, v_step - 1,
            p_rank, p_cluster, p_step USING HINT = 'Another session trained it meanwhile: run the step again.';
        END IF;
        v_lo := p_rank * batch_size / p_nranks;  -- rows [floor(r B / n), floor((r + 1) B / n)) of the global batch
        v_hi := (p_rank + 1) * batch_size / p_nranks;
        v_tape := llm_scratch_mark();
        v_loss := 0;
        FOR micro IN 1 .. grad_accum LOOP  -- the rank's rows of each micro-batch, as llm_train_step's loop
          mb := llm_train_micro(dataset, split, batch_size, seed, v_step, micro, v_lo, v_hi, TRUE);
          v_sums := v_sums || mb.sums;
          v_loss := v_loss + llm_gpt2_loss_backward(model, mb.tokens, mb.targets, mb.seq_len, v_tape, dropout,
            llm_site_seed(seed, v_step::TEXT || ':' || micro::TEXT), (v_hi - v_lo)::FLOAT8 / batch_size / grad_accum,
            p_hold => TRUE, p_row0 => v_lo * mb.seq_len) / grad_accum;
          v_ntok := v_ntok + cardinality(mb.tokens);
        END LOOP;
        DELETE FROM {GRAD} AS d WHERE d.cluster = p_cluster AND d.model = llm_dp_rank_grads.model AND d.rank = p_rank;
        tiles := 0;
        FOR p IN SELECT v.id, v.name FROM llm_tensor AS v WHERE v.model = llm_dp_rank_grads.model AND v.role = 'param'
                 AND v.id > 0 ORDER BY v.id LOOP
          v_g := llm_grad_of(v_tape, p.id);
          CONTINUE WHEN v_g IS NULL;
          PERFORM llm_held_write(v_g);  -- a held gradient as tiles (0: it has tiles already)
          INSERT INTO {GRAD} (cluster, model, rank, nonce, step, name, tr, tc, data)
          SELECT p_cluster, model, p_rank, p_nonce, v_step, p.name, t.tr, t.tc, t.data FROM llm_tile AS t
          WHERE t.tensor_id = v_g;
          GET DIAGNOSTICS v_n = ROW_COUNT;
          tiles := tiles + v_n;
        END LOOP;
        DELETE FROM llm_tape AS tp WHERE tp.tape = v_tape;
        DELETE FROM llm_tape_grad AS tg WHERE tg.tape = v_tape;
        PERFORM llm_mk_hold(v_tape, FALSE);
        PERFORM llm_scratch_release(v_tape);
        rank := p_rank;
        loss := v_loss * (v_hi - v_lo) / batch_size;
        tokens := v_ntok;
        batch := md5(array_to_string(v_sums, ','));
        RETURN NEXT;
    """)
    return function("llm_dp_rank_grads", f"p_cluster TEXT, p_nonce TEXT, p_rank INT, p_nranks INT, p_step INT, "
                    f"{STEP_ARGS}", "TABLE(rank INT, loss FLOAT8, tokens BIGINT, tiles BIGINT, batch TEXT)",
                    "#variable_conflict use_column\n" + body, settings=KERNEL_SETTINGS, note="""
        Phase 1 of a cluster step on rank p_rank of p_nranks (committed on its own): forward + backward of its rows of
        each of the step's grad_accum global micro-batches with the loss scaled by rows / batch_size / grad_accum
        (the gradients accumulated on one tape), the gradient tiles into llm_dp_grad under
        p_nonce. Returns its share of the loss (loss x rows / batch_size), its tokens, the tiles written and an md5
        of the global batch's rows (every rank must have drawn the same).""")


def _apply() -> str:
    body = plpgsql("""
        v_step INT; v_tape BIGINT; v_conn TEXT; st RECORD; v_params BIGINT[]; v_names TEXT[]; v_grads BIGINT[];
        v_geoms INT[] := '{}'; v_have BOOLEAN[]; v_norm FLOAT8; v_coef FLOAT8; v_lr FLOAT8; v_log llm_train_log;
        p RECORD;
    """, f"""
        PERFORM llm_model_writable(model, 'llm_cluster_train_step');
        PERFORM llm_train_guard(model);
        v_step := (SELECT m.step FROM llm_model AS m WHERE m.name = llm_dp_rank_apply.model FOR UPDATE) + 1;
        IF v_step <> p_step THEN
          RAISE EXCEPTION 'pg_llm: model "%" is at step % on rank % of cluster "%", the step is %', model, v_step - 1,
            p_rank, p_cluster, p_step USING HINT = 'Another session trained it meanwhile: run the step again.';
        END IF;
        FOREACH v_conn IN ARRAY ARRAY(SELECT 'pg_llm_dp_peer_' || x.r FROM unnest(p_ranks) AS x(r)
                                      WHERE x.r <> p_rank) LOOP
          IF v_conn = ANY (coalesce(dblink_get_connections(), '{{}}')) THEN
            PERFORM dblink_disconnect(v_conn);
          END IF;
          PERFORM dblink_connect(v_conn, 'llm_peer_' || p_cluster || '_' || substr(v_conn, 16));
        END LOOP;
        v_tape := llm_scratch_mark();
        v_params := ARRAY[]::BIGINT[]; v_names := ARRAY[]::TEXT[]; v_grads := ARRAY[]::BIGINT[];
        FOR p IN SELECT v.id, v.name, v.shape, v.tile FROM llm_tensor AS v
                 WHERE v.model = llm_dp_rank_apply.model AND v.role = 'param' AND v.id > 0 ORDER BY v.id LOOP
          v_params := v_params || p.id;
          v_names := v_names || p.name;
          v_grads := v_grads || llm_tensor_create('dp:' || p.name, p.shape, p.tile, 'grad');
          v_geoms := v_geoms || ARRAY[llm_rows(p.shape), llm_cols(p.shape), least(p.tile[1], llm_rows(p.shape)),
                                      least(p.tile[2], llm_cols(p.shape))];
        END LOOP;
        v_have := llm_mk_dp_sum(v_tape, p_cluster, model, p_nonce, p_ranks, p_rank, v_names, v_grads, v_geoms,
                                p_counts, {DBLINK_SCHEMA});
        FOREACH v_conn IN ARRAY ARRAY(SELECT 'pg_llm_dp_peer_' || x.r FROM unnest(p_ranks) AS x(r)
                                      WHERE x.r <> p_rank) LOOP
          PERFORM dblink_disconnect(v_conn);
        END LOOP;
        DELETE FROM {GRAD} AS d WHERE d.cluster = p_cluster AND d.model = llm_dp_rank_apply.model AND d.rank = p_rank;
        -- from here on as llm_train_step (api/train.py), on the summed gradients
        v_norm := llm_global_grad_norm(ARRAY(SELECT v_grads[i] FROM generate_subscripts(v_grads, 1) AS i
                                             WHERE v_have[i]));
        v_coef := llm_clip_coef(v_norm, grad_clip);
        v_lr := llm_lr_at(v_step, lr, warmup_steps, coalesce(max_steps, v_step), min_lr);
        FOR i IN 1 .. cardinality(v_params) LOOP
          CONTINUE WHEN NOT v_have[i];  -- like torch: a parameter without a gradient is not updated
          st := llm_adamw_state(v_params[i]);
          PERFORM llm_adamw_step(v_params[i], v_grads[i], st.m_id, st.v_id, v_step, v_lr, beta1, beta2, eps,
            CASE WHEN llm_param_decays(v_names[i]) THEN weight_decay ELSE 0 END, v_coef);
        END LOOP;
        PERFORM llm_model_write_lock(model);
        UPDATE llm_model AS m SET step = v_step WHERE m.name = llm_dp_rank_apply.model;
        PERFORM llm_mk_hold(v_tape, FALSE);
        PERFORM llm_scratch_release(v_tape);
        INSERT INTO llm_train_log AS l (model, step, loss, lr, grad_norm, tokens, seconds, dataset, batch_size, seed,
                                        schedule)
        VALUES (model, v_step, p_loss, v_lr, v_norm, p_tokens, extract(EPOCH FROM clock_timestamp() - p_t0), dataset,
                batch_size, seed, {schedule_of("coalesce(max_steps, v_step)")})
        RETURNING * INTO v_log;
        rank := p_rank;
        checksum := (SELECT s.checksum FROM llm_cluster_model_sum(model) AS s);
        log := to_jsonb(v_log);
        RETURN NEXT;
    """)
    out = [function("llm_dp_rank_apply", "p_cluster TEXT, p_nonce TEXT, p_ranks INT[], p_rank INT, p_step INT, "
                    f"p_counts BIGINT[], p_loss FLOAT8, p_tokens BIGINT, p_t0 TIMESTAMPTZ, {STEP_ARGS}",
                    "TABLE(rank INT, checksum TEXT, log JSONB)", "#variable_conflict use_column\n" + body,
                    settings=KERNEL_SETTINGS, note="""
        Phase 2 of a cluster step on rank p_rank (in the transaction the coordinator PREPAREs): every rank's
        gradient tiles of p_nonce summed in rank order (llm_mk_dp_sum; p_counts: the tiles each wrote), then the
        global norm, clip, lr and AdamW as llm_train_step, the step, the llm_train_log row (loss p_loss and tokens
        p_tokens of the global batch), this rank's tiles deleted; returns the checksum of the new parameters and
        moments and the log row.""")]
    out.append(function(
        "llm_mk_dp_sum", "tape BIGINT, cluster TEXT, model TEXT, nonce TEXT, ranks INT[], me INT, names TEXT[], "
        "gids BIGINT[], geoms INT[], counts BIGINT[], dblink_schema TEXT", "BOOLEAN[]",
        kernel_body(dp_sum_kernel, "dp_sum_kernel(plpy, GD, tape, cluster, model, nonce, ranks, me, names, gids, "
                                   "geoms, counts, dblink_schema)"),
        language="plpython3u", strict=True, settings=("jit = off",), note="""
        The sum over ranks (in the order of ranks) of a cluster step's gradient tiles (nonce), held in this
        backend's memory under tape as the gradients gids of parameters names (geoms: rows, cols, tile rows, tile
        cols each); the others' read through dblink connections pg_llm_dp_peer_<rank>. Returns which parameters got
        a gradient (py/kernels/dp.py)."""))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _table(), _info(), _peers(), _grads(), _apply()])
