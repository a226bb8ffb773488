"""A training run keeps its schedule: every llm_train_log row stores the hyperparameters, dataset and batch its
step ran with (`schedule`), and a training loop on a model that has steps starts from the last one's. An
argument the call passes overrides it (a NOTICE says what changed); one it leaves out keeps the run's value,
not the default. So extending a 20-step run to 24 steps keeps max_steps 20 (steps 21-24 at min_lr, as
nanoGPT's lr_decay_iters), and resuming with fewer arguments trains exactly as the run began.
"""
from __future__ import annotations

import json

from pg_llm.config import TrainConfig
from pg_llm.gen.emit import comment, function, plpgsql

SQL_FILE = "api/train_resume.sql"
ORDER = 86

# what a step records and a loop resumes: the recipe (config.TrainConfig), then the data it reads
TYPES = {**TrainConfig.sql_types(), "dataset": "TEXT", "batch_size": "INT", "split": "TEXT"}
DEFAULTS = {**TrainConfig.defaults(), "batch_size": 8, "split": "train"}
GIVEN = "jsonb_strip_nulls(jsonb_build_object(" + ", ".join(f"'{n}', {n}" for n in TYPES) + "))"


def schedule_of(max_steps: str) -> str:
    """The schedule JSON a step logs (its own arguments; max_steps as it used it)."""
    return GIVEN.replace("'max_steps', max_steps", f"'max_steps', {max_steps}")


def prologue(stored: str | None = None) -> str:
    """PL/pgSQL lines for a loop's start: its arguments become the run's schedule (llm_train_resume); stored: an
    expression for the last logged schedule when it is not in this database's llm_train_log (a cluster's ranks)."""
    sets = "\n".join(f"        {n} := (v_sched ->> '{n}')::{t};" for n, t in TYPES.items())
    call = f"llm_train_resume_from(model, steps, {GIVEN}, {stored})" if stored else \
        f"llm_train_resume(model, steps, {GIVEN})"
    return f"\n        v_sched := {call};\n{sets}"


def _resume() -> str:
    body = plpgsql("v_stored JSONB := p_stored; v_out JSONB; v_changed TEXT;", f"""
        v_out := '{json.dumps(DEFAULTS)}'::JSONB || jsonb_build_object('max_steps', p_steps)
                 || coalesce(v_stored, '{{}}') || p_given;
        IF v_stored IS NULL THEN
          RETURN v_out;  -- a new run: its arguments, else the defaults (max_steps: its own steps)
        END IF;
        v_changed := (SELECT string_agg(format('%s %s (was %s)', g.key, g.value, coalesce(v_stored -> g.key, 'null')),
                                        ', ' ORDER BY g.key)
                      FROM jsonb_each(p_given) AS g WHERE v_stored -> g.key IS DISTINCT FROM g.value);
        IF v_changed IS NOT NULL THEN
          RAISE NOTICE 'pg_llm: model "%" resumes its run with %', p_model, v_changed
            USING HINT = 'Arguments a call passes change the schedule the model was trained with; left out, they '
              'keep it.';
        END IF;
        IF NOT p_given ? 'max_steps' AND (v_stored ->> 'max_steps')::INT <> p_steps THEN
          RAISE NOTICE 'pg_llm: model "%" resumes on the lr schedule it was trained with (max_steps %): steps '
            'after it run at min_lr', p_model, v_stored ->> 'max_steps'
            USING HINT = format('Pass max_steps => %s to stretch the schedule to this run''s %s steps.', p_steps,
                                p_steps);
        END IF;
        RETURN v_out;
    """)
    out = [function("llm_train_resume_from", "p_model TEXT, p_steps INT, p_given JSONB, p_stored JSONB", "JSONB", body,
                    note="A loop's schedule: the arguments it was given (p_given, NULLs left out) over the model's "
                         "last logged schedule (p_stored) over the defaults; NOTICEs what a resumed run changes.")]
    out.append(function("llm_train_resume", "p_model TEXT, p_steps INT, p_given JSONB", "JSONB", plpgsql("", """
        RETURN llm_train_resume_from(p_model, p_steps, p_given, (
          @stored
        ));
    """, stored="SELECT l.schedule FROM llm_train_log AS l WHERE l.model = p_model ORDER BY l.step DESC LIMIT 1"),
        note="llm_train_resume_from with the model's last schedule in this database's llm_train_log."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _resume()])
