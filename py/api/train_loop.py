"""The training loop: CALL llm_train_run(...) (a procedure committing after every step) and
SELECT llm_train(...) (a function driving each step through a loopback dblink connection, so every step
commits in its own transaction even though a SELECT cannot COMMIT). Both resume from llm_model.step up to
`steps` total steps, log every step, evaluate every eval_every steps, and keep llm_train_job current.
"""
from __future__ import annotations

from pg_llm.api.train import check_call
from pg_llm.api.train_resume import prologue
from pg_llm.config import TrainConfig
from pg_llm.gen.emit import comment, function, plpgsql, procedure

SQL_FILE = "api/train_loop.sql"
ORDER = 87

HYPER_NAMES = TrainConfig.names()
# NULL: the run's own value when the model resumes a run (api/train_resume.py), else the default
LOOP_ARGS = ("model TEXT, steps INT, dataset TEXT DEFAULT NULL, batch_size INT DEFAULT NULL, "
             + ", ".join(f"{n} {t} DEFAULT NULL" for n, t in TrainConfig.sql_types().items())
             + ", eval_every INT DEFAULT 0, eval_rows INT DEFAULT 64, split TEXT DEFAULT NULL, "
               "grad_workers INT DEFAULT NULL, prune_workers INT DEFAULT NULL")


def _eval() -> str:
    body = plpgsql("v_sum FLOAT8 := 0; v_n INT := 0; v_tokens INT[]; v_targets INT[]; v_t INT; r RECORD;", """
        PERFORM llm_model_get(model);
        IF max_rows IS NOT NULL AND max_rows < 1 THEN
          RAISE EXCEPTION 'pg_llm: llm_eval_loss: max_rows must be >= 1, got %', max_rows
            USING HINT = 'Leave max_rows out (NULL) to evaluate every row of the split.';
        END IF;
        FOR r IN
          @rows
        LOOP
          v_sum := v_sum + llm_loss(model, r.tokens, r.targets) * cardinality(r.tokens);
          v_n := v_n + cardinality(r.tokens);
        END LOOP;
        IF v_n = 0 THEN
          RAISE EXCEPTION 'pg_llm: dataset "%" has no rows in split "%"', dataset, split
            USING HINT = 'pg-llm corpus load assigns a validation split with --val-fraction.';
        END IF;
        RETURN v_sum / v_n;
    """, rows="""
        SELECT d.tokens, d.targets FROM llm_dataset AS d WHERE d.dataset = llm_eval_loss.dataset
          AND d.split = llm_eval_loss.split ORDER BY d.id LIMIT max_rows""")
    return function("llm_eval_loss", "model TEXT, dataset TEXT, split TEXT DEFAULT 'val', max_rows INT DEFAULT NULL",
                    "FLOAT8", body, note="Mean loss per token (dropout off) over the first max_rows rows of a split.")


def _claim() -> str:
    body = plpgsql("v_pid INT; v_step INT;", """
        PERFORM llm_train_guard(p_model, p_pid);
        v_step := (SELECT m.step FROM llm_model AS m WHERE m.name = p_model);
        INSERT INTO llm_train_job AS j (model, pid, started_at, first_step, target_step, step)
        VALUES (p_model, p_pid, clock_timestamp(), v_step, p_steps, v_step)
        ON CONFLICT (model) DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at,
          first_step = excluded.first_step, target_step = excluded.target_step, step = excluded.step,
          loss = NULL, tokens_per_s = NULL, updated_at = clock_timestamp();
        RETURN v_step;
    """)
    return function("llm_train_claim", "p_model TEXT, p_steps INT, p_pid INT", "INT", body,
                    note="Register a training loop (pid) as the model's trainer; error when another one runs.")


def _hints() -> str:
    body = plpgsql("", """
        PERFORM llm_model_get(p_model);
        PERFORM llm_model_writable(p_model, 'training');
        IF p_dataset IS NULL THEN
          p_dataset := (SELECT min(d.dataset) FROM llm_dataset AS d);
          IF p_dataset IS NULL THEN
            RAISE EXCEPTION 'pg_llm: llm_train: llm_dataset is empty'
              USING HINT = 'Load a corpus first: pg-llm corpus load --name NAME FILES...';
          END IF;
          IF (SELECT count(DISTINCT d.dataset) FROM llm_dataset AS d) > 1 THEN
            RAISE EXCEPTION 'pg_llm: llm_train: several datasets are loaded; name one with dataset => ...'
              USING HINT = 'SELECT dataset FROM llm_datasets lists them.';
          END IF;
        END IF;
        IF p_grad_workers IS NOT NULL OR p_prune_workers IS NOT NULL THEN
          RAISE NOTICE 'pg_llm: grad_workers => % and prune_workers => % are accepted for playbook compatibility '
            'and ignored: pg_llm runs each kernel in one backend (parallel workers would re-import numpy, '
            '~75 ms each, longer than most kernels)', p_grad_workers, p_prune_workers;
        END IF;
        RETURN p_dataset;
    """)
    return function("llm_train_prepare", "p_model TEXT, p_dataset TEXT, p_split TEXT, p_grad_workers INT, "
                    "p_prune_workers INT", "TEXT", body,
                    note="Resolve a training call's dataset (default: the only one) and report ignored playbook "
                         "arguments; the rest is llm_train_check's, right after.")


NOTICE = """
        RAISE NOTICE '%', format('step %s/%s | loss %s | lr %s | %s tok/s | ETA %s%s', v_log.step, steps,
          round(v_log.loss::NUMERIC, 4), to_char(v_log.lr, '9.999EEEE'), round(v_log.tokens / v_log.seconds),
          date_trunc('second', (clock_timestamp() - v_t0) * ((steps - v_log.step)::FLOAT8
            / greatest(v_log.step - v_first, 1))),
          CASE WHEN v_val IS NOT NULL THEN ' | val_loss ' || round(v_val::NUMERIC, 4) ELSE '' END);
"""

STEP_CALL = ("llm_train_step(model, dataset, batch_size, "
             + ", ".join(f"{n} => {n}" for n in HYPER_NAMES if n != "max_steps")
             + ", max_steps => coalesce(max_steps, steps), split => split")


def loop_check(caller: str) -> str:
    """A loop's own arguments, then every argument of its steps (llm_train_check), before it claims the model."""
    return f"""
        IF steps IS NULL OR steps < 1 THEN
          RAISE EXCEPTION 'pg_llm: {caller}: steps must be >= 1, got %', coalesce(steps::TEXT, 'NULL')
            USING HINT = 'steps is how many steps the model should have made '
              'in all (it resumes from llm_model.step).';
        END IF;
        IF eval_every IS NULL OR eval_every < 0 OR eval_rows IS NULL OR eval_rows < 1 THEN
          RAISE EXCEPTION 'pg_llm: {caller}: need eval_every >= 0 and eval_rows >= 1, got % and %',
            coalesce(eval_every::TEXT, 'NULL'), coalesce(eval_rows::TEXT, 'NULL')
            USING HINT = 'eval_every => 0 (the default) never evaluates.';
        END IF;
        PERFORM {check_call(caller, "coalesce(max_steps, steps)")};"""


def _procedure() -> str:
    declare = """
        v_first INT; v_t0 TIMESTAMPTZ; v_log @extschema@.llm_train_log; v_val FLOAT8; v_stop TEXT; v_conn TEXT;
        v_step INT; v_free INT8; v_now INT8; v_growth INT8; v_sched JSONB;
    """
    body = f"""
        v_t0 := clock_timestamp();
        v_conn := 'pg_llm_vacuum_' || pg_backend_pid();
        v_free := llm_disk_free();
        v_growth := 0;
{prologue()}
        dataset := llm_train_prepare(model, dataset, split, grad_workers, prune_workers);{loop_check("llm_train_run")}
        v_growth := llm_train_step_need(model, dataset, batch_size, grad_accum);  -- the first step's: estimated
        v_first := llm_train_claim(model, steps, pg_backend_pid());
        IF NOT pg_has_role((SELECT c.relowner FROM pg_class AS c WHERE c.oid = 'llm_tile_durable'::REGCLASS),
                           'USAGE') THEN
          RAISE NOTICE 'pg_llm: llm_train_run leaves the old tile versions of its steps to autovacuum (within a '
            'minute or so): only the owner of pg_llm''s tables may VACUUM them';
          v_conn := NULL;
        ELSE
          BEGIN
            PERFORM llm_loopback_connect(v_conn);
          EXCEPTION WHEN OTHERS THEN  -- train anyway: autovacuum reclaims, later
            RAISE WARNING 'pg_llm: llm_train_run cannot vacuum between steps: %', SQLERRM
              USING HINT = 'Its loopback connection failed: set pg_llm.loopback to the missing conninfo (e.g. '
                'password=...). Until then autovacuum reclaims the old tile versions, up to a minute later.';
            v_conn := NULL;
          END;
        END IF;
        -- no COMMIT here: the claim commits with the first step, so a first step that fails leaves no trace
        LOOP
          v_step := (SELECT m.step FROM llm_model AS m WHERE m.name = model);
          EXIT WHEN v_step >= steps;
          v_stop := llm_train_room('CALL llm_train_run', v_step, v_free, v_growth);
          IF v_stop IS NOT NULL THEN
            RAISE WARNING '%', v_stop USING HINT = 'Free disk space (or lower pg_llm.min_free_disk), then CALL '
              'llm_train_run(...) again: it resumes at the next step.';
            EXIT;
          END IF;
          v_log := {STEP_CALL});
          v_val := NULL;
          IF eval_every > 0 AND (v_log.step % eval_every = 0 OR v_log.step = steps) THEN
            v_val := llm_eval_loss(model, dataset, 'val', eval_rows);
            UPDATE llm_train_log AS l SET val_loss = v_val WHERE l.model = v_log.model AND l.step = v_log.step;
          END IF;
          UPDATE llm_train_job AS j SET step = v_log.step, loss = v_log.loss,
            tokens_per_s = v_log.tokens / v_log.seconds, updated_at = clock_timestamp() WHERE j.model = v_log.model;
    """ + NOTICE + """
          COMMIT;
          -- the step's old tile versions are dead to every snapshot now: reclaim them (VACUUM cannot run here)
          PERFORM llm_loopback_vacuum(v_conn);
          v_now := llm_disk_free();
          v_growth := greatest(v_free - v_now, 0);  -- the last step's: pages are reused after VACUUM
          v_free := v_now;
        END LOOP;
        PERFORM llm_loopback_close(v_conn);
    """
    return procedure("llm_train_run", LOOP_ARGS, declare, body,
                     note="""CALL form of the training loop: steps are committed one by one (an interruption
                     loses at most the step in progress); resumes at llm_model.step up to `steps`. After
                     each commit it vacuums the tile partitions (through dblink: VACUUM cannot run in a
                     procedure), so disk use stays flat; it stops with a WARNING before the disk fills.""")


def _function() -> str:
    names = [n for n in HYPER_NAMES if n != "max_steps"]
    # the first step's statement claims the model too (FROM runs first): one transaction, nothing left if it fails
    remote_step = ("format('SELECT (llm_train_step(%L, %L, %s, " + ", ".join(f"{n} => %L" for n in names)
                   + ", max_steps => %s, split => %L, on_behalf_of => %s)).step FROM (SELECT %s OFFSET 0) AS c', "
                   "model, dataset, batch_size, " + ", ".join(names)
                   + ", coalesce(max_steps, steps), split, pg_backend_pid(), v_claim)")
    body = plpgsql("""
        v_first INT; v_t0 TIMESTAMPTZ := clock_timestamp(); v_log llm_train_log; v_val FLOAT8; v_conn TEXT;
        v_loss FLOAT8; v_step INT; v_stop TEXT; v_free INT8 := llm_disk_free(); v_now INT8; v_growth INT8 := 0;
        v_claim TEXT; v_sql TEXT; v_sched JSONB;
    """, f"""
{prologue()}
        dataset := llm_train_prepare(model, dataset, split, grad_workers, prune_workers);{loop_check("llm_train")}
        v_growth := llm_train_step_need(model, dataset, batch_size, grad_accum);  -- the first step's: estimated
        v_conn := 'pg_llm_train_' || pg_backend_pid();
        PERFORM llm_loopback_connect(v_conn);
        v_claim := format('llm_train_claim(%L, %s, %s)', model, steps, pg_backend_pid());
        v_step := (SELECT x.step FROM dblink(v_conn, format('SELECT step FROM llm_model WHERE name = %L', model))
                   AS x(step INT));
        PERFORM llm_train_pinned_notice(model, v_step, steps);
        LOOP
          v_step := (SELECT s FROM dblink(v_conn, format('SELECT step FROM llm_model WHERE name = %L', model))
                     AS x(s INT));
          EXIT WHEN v_step >= steps;
          v_stop := llm_train_room('SELECT llm_train', v_step, v_free, v_growth);
          IF v_stop IS NOT NULL THEN
            RAISE WARNING '%', v_stop USING HINT = 'A SELECT cannot let PostgreSQL reclaim what its steps rewrote '
              'until it returns: run it again (it resumes at the next step), or use CALL llm_train_run(...), '
              'which reclaims them after every step.';
            EXIT;
          END IF;
          v_sql := {remote_step};
          PERFORM llm_loopback_run(v_conn, v_sql);  -- v_sql: a cancel's CONTEXT shows this line, not the format
          v_claim := '1';
          v_now := llm_disk_free();
          v_growth := greatest(v_growth, v_free - v_now);  -- the largest step's: nothing is reclaimed meanwhile
          v_free := v_now;
          SELECT * INTO v_log FROM llm_train_log AS l WHERE l.model = llm_train.model ORDER BY l.step DESC LIMIT 1;
          v_first := coalesce(v_first, v_log.step - 1);
          v_val := NULL;
          IF eval_every > 0 AND (v_log.step % eval_every = 0 OR v_log.step = steps) THEN
            v_val := llm_loopback_run(v_conn, format('SELECT llm_eval_loss(%L, %L, %L, %s)', model, dataset, 'val',
                                                      eval_rows))::FLOAT8;
            PERFORM dblink_exec(v_conn, format('UPDATE llm_train_log SET val_loss = %s WHERE model = %L AND step = %s',
                                               v_val, model, v_log.step));
          END IF;
          PERFORM dblink_exec(v_conn, format('UPDATE llm_train_job SET step = %s, loss = %s, tokens_per_s = %s, '
            'updated_at = clock_timestamp() WHERE model = %L', v_log.step, v_log.loss, v_log.tokens / v_log.seconds,
            model));
          v_loss := v_log.loss;
    """ + NOTICE + """
        END LOOP;
        PERFORM dblink_disconnect(v_conn);
        RETURN v_loss;
    """)
    return function("llm_train", LOOP_ARGS, "FLOAT8", body,
                    note="""SELECT form of the training loop: each step runs and commits in its own transaction
                    through a loopback dblink connection (set pg_llm.loopback to extra conninfo, e.g. a password,
                    if the server needs it). Resumes at llm_model.step up to `steps`; returns the last loss.
                    Its snapshot keeps what the steps rewrite on disk until it returns (see train_space): it stops
                    with a WARNING before the disk fills; CALL llm_train_run reclaims after every step.""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _eval(), _claim(), _hints(), _procedure(), _function()])
