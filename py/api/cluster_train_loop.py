"""The data-parallel training loop (docs/scaleout.md, "Data-parallel training"): CALL llm_cluster_train_run(cluster,
model, steps, ...) runs llm_cluster_train_step's step (llm_dp_train, api/cluster_train.py) until the ranks' model
has made `steps` steps, committing after each one, like CALL llm_train_run (api/train_loop.py): it resumes at the
ranks' step and with the run's schedule (rank 0's last llm_train_log row), NOTICEs its progress, and vacuums on
every rank what a step rewrote.

The coordinator keeps one dblink connection per rank for the whole loop, so each rank's backend (its weight cache,
its imported numpy) serves every step; a step that fails closes them (a rank's open transaction rolls back), and
the loop closes them when it ends.
"""
from __future__ import annotations

from pg_llm.api.cluster_train_io import CONN
from pg_llm.api.train_loop import NOTICE
from pg_llm.api.train_resume import prologue
from pg_llm.config import TrainConfig
from pg_llm.gen.emit import comment, function, plpgsql, procedure
from pg_llm.gen.surface import INTERNAL

SQL_FILE = "api/cluster_train_loop.sql"
ORDER = 95  # after api/cluster_train.sql (llm_dp_train) and api/train_loop.sql

ARGS = ("cluster TEXT, model TEXT, steps INT, dataset TEXT DEFAULT NULL, batch_size INT DEFAULT NULL, "
        + ", ".join(f"{n} {t} DEFAULT NULL" for n, t in TrainConfig.sql_types().items())
        + ", split TEXT DEFAULT NULL")
STEP_CALL = ("llm_dp_train(cluster, model, dataset, batch_size, "
             + ", ".join(f"{n} => {n}" for n in TrainConfig.names() if n != "max_steps")
             + ", max_steps => coalesce(max_steps, steps), split => split, p_keep => TRUE, "
               "p_caller => 'llm_cluster_train_run')")


VACUUM_SQL = f"{INTERNAL}.llm_dp_rank_vacuum_sql()"


def _vacuum() -> str:
    body = plpgsql("v_sqls JSONB[];", f"""
        BEGIN
          v_sqls := llm_dp_gather(p_cluster, p_ranks, ARRAY(SELECT 'SELECT to_jsonb({VACUUM_SQL})'
                                                              FROM unnest(p_ranks)));
          FOR i IN 1 .. cardinality(p_ranks) LOOP
            PERFORM dblink_send_query({CONN.format(r='p_ranks[i]')}, v_sqls[i] #>> '{{}}');
          END LOOP;
          PERFORM llm_dp_wait(p_ranks);
          FOR i IN 1 .. cardinality(p_ranks) LOOP
            PERFORM * FROM dblink_get_result({CONN.format(r='p_ranks[i]')}) AS x(v TEXT);
            PERFORM * FROM dblink_get_result({CONN.format(r='p_ranks[i]')}, FALSE) AS x(v TEXT);  -- the end
          END LOOP;
        EXCEPTION WHEN OTHERS THEN  -- a failed VACUUM must not stop training; the next step checks the ranks
          RAISE WARNING 'pg_llm: could not vacuum the ranks of cluster "%": %', p_cluster, SQLERRM
            USING HINT = 'Autovacuum reclaims the old tile versions later.';
          PERFORM llm_dp_close(p_ranks);  -- a connection left mid-statement: the next step connects anew
        END;
    """)
    return function("llm_dp_vacuum", "p_cluster TEXT, p_ranks INT[]", "VOID", body, note="""
        VACUUM on every rank (in parallel, through the loop's connections) what a committed step rewrote
        (llm_dp_rank_vacuum_sql); a failure is a WARNING.""")


def _procedure() -> str:
    declare = """
        v_t0 TIMESTAMPTZ; v_first INT; v_step INT; v_ranks INT[]; v_log @extschema@.llm_train_log; v_val FLOAT8;
        v_stored JSONB; v_sched JSONB; v_rank0 JSONB;
    """
    resume = (f"format('SELECT to_jsonb(x) FROM {INTERNAL}.llm_dp_rank_resume(%L) AS x', model)")
    body = f"""
        v_t0 := clock_timestamp();
        PERFORM llm_cluster_require();
        v_ranks := llm_cluster_ranks_of(cluster);
        IF coalesce(model, '') = '' THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_train_run: model must be named' USING HINT = 'Pass model => NAME.';
        END IF;
        IF steps IS NULL OR steps < 1 THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_train_run: steps must be >= 1, got %', coalesce(steps::TEXT, 'NULL')
            USING HINT = 'steps is how many steps the model should have made in all (it resumes at the ranks'' step).';
        END IF;
        BEGIN
          PERFORM llm_dp_open(cluster, v_ranks, TRUE);
          v_rank0 := (llm_dp_gather(cluster, v_ranks[1:1], ARRAY[{resume}]))[1];
        EXCEPTION WHEN OTHERS OR query_canceled THEN
          PERFORM llm_dp_close(v_ranks);
          RAISE;
        END;
        v_stored := v_rank0 -> 'schedule';
        IF v_stored = 'null'::JSONB THEN
          v_stored := NULL;
        END IF;
{prologue("v_stored")}
        IF dataset IS NULL THEN
          PERFORM llm_dp_close(v_ranks);
          RAISE EXCEPTION 'pg_llm: llm_cluster_train_run: model "%" has no run on cluster "%" to resume: name its '
            'dataset', model, cluster USING HINT = 'Pass dataset => NAME, a dataset loaded into every rank with the '
            'same rows and ids (docs/scaleout.md).';
        END IF;
        v_step := (v_rank0 ->> 'step')::INT;  -- NULL: rank 0 has no such model, and the first step says so
        v_first := v_step;
        LOOP
          EXIT WHEN v_step >= steps;
          BEGIN
            v_log := {STEP_CALL};
          EXCEPTION WHEN OTHERS OR query_canceled THEN  -- a refusal before the step opened its own, say
            PERFORM llm_dp_close(v_ranks);
            RAISE;
          END;
          v_step := v_log.step;
          v_val := NULL;
    """ + NOTICE + """
          COMMIT;
          -- what the step rewrote is dead to every snapshot now: reclaim it on the ranks (VACUUM runs outside one)
          PERFORM llm_dp_vacuum(cluster, v_ranks);
        END LOOP;
        PERFORM llm_dp_close(v_ranks);
    """
    return procedure("llm_cluster_train_run", ARGS, declare, body, note="""
        CALL form of data-parallel training: llm_cluster_train_step's step on every rank of cluster `cluster`
        until the ranks' model has made `steps` steps, each committed on every rank or on none and then here;
        resumes at the ranks' step with the run's schedule (arguments left NULL keep it), NOTICEs each step,
        vacuums the ranks after each; one connection per rank serves every step.""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _vacuum(), _procedure()])
