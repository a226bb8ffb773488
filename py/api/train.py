"""Training from SQL: one optimizer step (llm_train_step) and the loop (CALL llm_train / SELECT llm_train).

A step: sample a seeded mini-batch of llm_dataset rows -> forward with a tape (dropout on) -> loss ->
backward -> global grad-norm clip -> AdamW with the warmup + cosine schedule -> log. Everything random in
step s is derived from (seed, s), so the step number is the RNG position: resuming at step s replays exactly
what an uninterrupted run would have done. Parameters and moments are durable; activations, gradients and
the tape are scratch and dropped when the step ends.
"""
from __future__ import annotations

import textwrap

from pg_llm.api.gpt2 import HEAD
from pg_llm.api.train_resume import DEFAULTS, schedule_of
from pg_llm.config import LN_F, TrainConfig
from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.ops.common import KERNEL_SETTINGS
from pg_llm.ops.gpt2_block import FUSED_TRAIN

SQL_FILE = "api/train.sql"
ORDER = 86

# The GPT-2 recipe (the user's playbook): every value is overridable per call.
HYPER = TrainConfig.sql_args()  # the hyperparameters, as arguments (config.TrainConfig)


def _tables() -> str:
    return "\n".join([
        stmt("""
            CREATE TABLE llm_train_log (
              model TEXT NOT NULL REFERENCES llm_model (name) ON DELETE CASCADE,
              step INT NOT NULL,
              loss FLOAT8 NOT NULL,
              lr FLOAT8 NOT NULL,
              grad_norm FLOAT8 NOT NULL,
              tokens BIGINT NOT NULL,
              seconds FLOAT8 NOT NULL,
              val_loss FLOAT8,
              dataset TEXT NOT NULL,
              batch_size INT NOT NULL,
              seed BIGINT NOT NULL,
              logged_at TIMESTAMPTZ NOT NULL DEFAULT now(),
              schedule JSONB NOT NULL,
              PRIMARY KEY (model, step)
            )""", "One row per completed optimizer step (committed with the step's parameter update); schedule "
                  "holds the hyperparameters, dataset and batch it ran with (a resumed loop keeps them)."),
        stmt("""
            CREATE TABLE llm_train_job (
              model TEXT PRIMARY KEY REFERENCES llm_model (name) ON DELETE CASCADE,
              pid INT NOT NULL,
              started_at TIMESTAMPTZ NOT NULL,
              first_step INT NOT NULL,
              target_step INT NOT NULL,
              step INT NOT NULL,
              loss FLOAT8,
              tokens_per_s FLOAT8,
              updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )""", "The running (or last) llm_train loop of each model; see the llm_train_progress view."),
        stmt("""
            CREATE VIEW llm_train_progress AS
            SELECT j.model, j.pid, EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = j.pid
                                           AND a.state = 'active') AS running,
                   j.step, j.target_step, round(100.0 * (j.step - j.first_step)
                   / greatest(j.target_step - j.first_step, 1), 1) AS pct, j.loss,
                   round(j.tokens_per_s::NUMERIC, 1) AS tokens_per_s, j.started_at, j.updated_at,
                   CASE WHEN j.step > j.first_step THEN justify_interval(date_trunc('second', (j.updated_at
                        - j.started_at) * ((j.target_step - j.step)::FLOAT8 / (j.step - j.first_step)))) END AS eta
            FROM llm_train_job AS j""", "Progress of training loops: step, loss, tokens/s, ETA."),
    ]) + "\n"


def _batch() -> str:
    body = plpgsql("v_rows INT; v_len INT; v_bad INT;", """
        v_rows := (
          @count
        );
        IF v_rows = 0 THEN
          RAISE EXCEPTION 'pg_llm: dataset "%" has no rows in split "%"', p_dataset, p_split
            USING HINT = 'Load a corpus with: pg-llm corpus load --name ' || p_dataset || ' FILES...';
        END IF;
        RETURN QUERY
          @pick;
    """, count="SELECT count(*) FROM llm_dataset AS d WHERE d.dataset = p_dataset AND d.split = p_split",
        pick="""
        SELECT d.tokens, d.targets FROM llm_dataset AS d
        WHERE d.dataset = p_dataset AND d.split = p_split
        ORDER BY md5(p_seed::TEXT || ':' || p_step::TEXT || ':' || p_micro::TEXT || ':' || d.id::TEXT)
        LIMIT p_batch_size""")
    return function("llm_train_batch", "p_dataset TEXT, p_split TEXT, p_batch_size INT, p_seed BIGINT, p_step INT, "
                    "p_micro INT", "TABLE(tokens INT[], targets INT[])", body, volatility="STABLE",
                    settings=KERNEL_SETTINGS,
                    note="The seeded mini-batch of step p_step (micro-batch p_micro): batch_size rows drawn by a "
                         "hash of (seed, step, micro, row id), so any session draws the same rows.")


def _micro() -> str:
    body = plpgsql("r RECORD;", """
        tokens := '{}'; targets := '{}'; sums := '{}';
        FOR r IN
          @rows
        LOOP
          IF seq_len IS NULL THEN seq_len := cardinality(r.tk); END IF;
          IF cardinality(r.tk) <> seq_len OR cardinality(r.tg) <> seq_len THEN
            RAISE EXCEPTION 'pg_llm: dataset "%": rows of different lengths (% and %) in one batch', p_dataset,
              seq_len, cardinality(r.tk) USING HINT = 'Load the corpus with one --block-size.';
          END IF;
          IF p_sums THEN sums := sums || md5(r.tk::TEXT || '/' || r.tg::TEXT); END IF;
          IF r.ord > p_lo AND r.ord <= p_hi THEN
            tokens := tokens || r.tk; targets := targets || r.tg;
          END IF;
        END LOOP;
    """, rows="SELECT b.tk, b.tg, b.ord FROM llm_train_batch(p_dataset, p_split, p_batch_size, p_seed, p_step, "
              "p_micro) WITH ORDINALITY AS b(tk, tg, ord)")
    return function("llm_train_micro", "p_dataset TEXT, p_split TEXT, p_batch_size INT, p_seed BIGINT, p_step INT, "
                    "p_micro INT, p_lo INT, p_hi INT, p_sums BOOLEAN, OUT tokens INT[], OUT targets INT[], "
                    "OUT seq_len INT, OUT sums TEXT[]", "RECORD", body, volatility="STABLE",
                    settings=KERNEL_SETTINGS,
                    note="""Micro-batch p_micro of step p_step (llm_train_batch): rows (p_lo, p_hi] of it (all:
                    0, p_batch_size; a data-parallel rank's share) as flat token and target arrays, the rows'
                    length (all rows' lengths checked), and with p_sums an md5 of every row of the micro-batch
                    (ranks compare them: the same rows everywhere).""")


def _grads() -> str:
    body = plpgsql("""
        v_tape BIGINT := llm_scratch_mark();
        v_after BIGINT := nextval('llm_tape_seq');
        v_logits BIGINT; v_loss FLOAT8; v_x BIGINT; v_head BIGINT; v_ln BIGINT[]; h RECORD; c llm_model_config;
    """, f"""
        IF {FUSED_TRAIN} THEN  -- fused blocks and a fused LM head + cross-entropy (ops/head_nll.py)
          IF p_hold THEN  -- parameter gradients in this backend's memory until the step ends (ops/held.py)
            PERFORM llm_mk_hold(p_tape, TRUE);
          END IF;
          v_x := llm_gpt2_forward(p_model, p_tokens, p_seq_len, p_tape, p_dropout, p_seed, p_hidden => TRUE,
                                  p_row0 => p_row0);
          c := llm_model_get(p_model);
          v_head := {HEAD};
          v_ln := ARRAY[llm_param(p_model, '{LN_F.params[0]}'), llm_param(p_model, '{LN_F.params[1]}')];
          -- ln_f, the head and the loss in one call; dhead kept in memory for the tape
          h := llm_head_nll(v_x, v_head, p_targets, p_loss_scale, p_tape, v_ln, c.layer_norm_epsilon);
          PERFORM llm_grad_acc(p_tape, u.t, u.g) FROM unnest(v_ln, h.dln) AS u(t, g);
          PERFORM llm_backward(p_tape, v_x, h.dx, v_after);  -- the tied wte's embedding backward adds it to its part
          v_x := llm_head_nll_flush(p_tape, v_head);  -- an untied head's gradient: nobody took it
          IF v_x IS NOT NULL THEN
            PERFORM llm_grad_acc(p_tape, v_head, v_x);
          END IF;
          RETURN h.loss;
        END IF;
        v_logits := llm_gpt2_forward(p_model, p_tokens, p_seq_len, p_tape, p_dropout, p_seed, p_row0 => p_row0);
        v_loss := llm_cross_entropy(v_logits, p_targets);
        PERFORM llm_backward(p_tape, v_logits, llm_cross_entropy_backward(v_logits, p_targets, NULL, p_loss_scale),
                             v_after);
        RETURN v_loss;
    """)
    return function("llm_gpt2_loss_backward", "p_model TEXT, p_tokens INT[], p_targets INT[], p_seq_len INT, "
                    "p_tape BIGINT, p_dropout FLOAT8 DEFAULT 0, p_seed BIGINT DEFAULT 0, "
                    "p_loss_scale FLOAT8 DEFAULT 1, p_hold BOOLEAN DEFAULT FALSE, p_row0 INT DEFAULT 0",
                    "FLOAT8", body, settings=KERNEL_SETTINGS,
                    note="""Forward (recorded on p_tape) + mean cross-entropy + backward of p_loss_scale * loss.
                    Parameter gradients accumulate on p_tape across calls (grad accumulation). p_hold (the fused
                    path): they stay in this backend's memory (ops/held.py: llm_grad_acc, llm_global_grad_norm and
                    llm_adamw_step read them there; llm_mk_hold(tape, FALSE) drops them). p_row0: the rows' first
                    token row in the whole batch (a data-parallel rank's share: its dropout masks).""")


def check_call(caller: str, max_steps: str = "max_steps") -> str:
    """llm_train_check over a training call's own arguments (named like TrainConfig's fields)."""
    args = [max_steps if n == "max_steps" else n for n in TrainConfig.names()]
    return f"llm_train_check('{caller}', dataset, split, batch_size, {', '.join(args)})"


STEP = f"""
    v_t0 := clock_timestamp();
    PERFORM llm_model_get(model);
    PERFORM llm_model_writable(model, 'llm_train_step');
    PERFORM llm_train_guard(model, on_behalf_of);
    PERFORM {check_call("llm_train_step")};
    PERFORM llm_train_disk_check('llm_train_step', model, dataset, batch_size, grad_accum);
    IF on_behalf_of IS NOT NULL AND NOT EXISTS (SELECT 1 FROM llm_train_job AS j
                                                WHERE j.model = llm_train_step.model AND j.pid = on_behalf_of) THEN
      RAISE EXCEPTION 'pg_llm: llm_train_step: on_behalf_of % is not the pid of this model''s training loop',
        on_behalf_of USING
        HINT = 'on_behalf_of is internal (SELECT llm_train passes it to its loopback steps): leave it out.';
    END IF;
    v_step := (SELECT m.step FROM llm_model AS m WHERE m.name = model FOR UPDATE) + 1;
    v_tape := llm_scratch_mark();
    FOR micro IN 1 .. grad_accum LOOP
      mb := llm_train_micro(dataset, split, batch_size, seed, v_step, micro, 0, batch_size, FALSE);
      v_loss := v_loss + llm_gpt2_loss_backward(model, mb.tokens, mb.targets, mb.seq_len, v_tape, dropout,
        llm_site_seed(seed, v_step::TEXT || ':' || micro::TEXT), 1.0 / grad_accum, p_hold => TRUE) / grad_accum;
      v_ntok := v_ntok + cardinality(mb.tokens);
    END LOOP;
    v_params := ARRAY(SELECT v.id FROM llm_tensor AS v WHERE v.model = llm_train_step.model AND v.role = 'param'
                      AND v.id > 0 ORDER BY v.id);
    v_grads := ARRAY(SELECT llm_grad_of(v_tape, p) FROM unnest(v_params) AS p);
    v_norm := llm_global_grad_norm(ARRAY(SELECT g FROM unnest(v_grads) AS g WHERE g IS NOT NULL));
    v_coef := llm_clip_coef(v_norm, grad_clip);
    v_lr := llm_lr_at(v_step, lr, warmup_steps, coalesce(max_steps, v_step), min_lr);
    FOR i IN 1 .. cardinality(v_params) LOOP
      CONTINUE WHEN v_grads[i] IS NULL;  -- like torch: a parameter without a gradient is not updated
      v_name := (SELECT v.name FROM llm_tensor AS v WHERE v.id = v_params[i]);
      st := llm_adamw_state(v_params[i]);
      PERFORM llm_adamw_step(v_params[i], v_grads[i], st.m_id, st.v_id, v_step, v_lr, beta1, beta2, eps,
        CASE WHEN llm_param_decays(v_name) THEN weight_decay ELSE 0 END, v_coef);
    END LOOP;
    PERFORM llm_model_write_lock(model);  -- readers in flight finish first: none sees half of this step
    UPDATE llm_model AS m SET step = v_step WHERE m.name = model;
    DELETE FROM llm_tape AS tp WHERE tp.tape = v_tape;
    DELETE FROM llm_tape_grad AS tg WHERE tg.tape = v_tape;
    PERFORM llm_mk_hold(v_tape, FALSE);  -- the held gradients
    PERFORM llm_scratch_release(v_tape);
    INSERT INTO llm_train_log AS l (model, step, loss, lr, grad_norm, tokens, seconds, dataset, batch_size, seed,
                                    schedule)
    VALUES (model, v_step, v_loss, v_lr, v_norm, v_ntok,
            extract(EPOCH FROM clock_timestamp() - v_t0), dataset, batch_size, seed,
            {schedule_of("coalesce(max_steps, v_step)")})
    RETURNING * INTO v_log;
    RETURN v_log;
"""


# An error or a cancel deep in a step's kernels used to print the generated statement it was in (~35 lines of
# CONTEXT): the step re-raises it with its message, detail, hint and SQLSTATE, and only the functions above.
SHORT_CONTEXT = """
    EXCEPTION WHEN OTHERS OR query_canceled THEN  -- OTHERS alone leaves cancels out
      GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
        v_state = RETURNED_SQLSTATE;
      PERFORM llm_reraise(v_msg, v_detail, v_hint, v_state);
    END;
"""


def _step() -> str:
    body = plpgsql("""
        v_t0 TIMESTAMPTZ; v_step INT; v_tape BIGINT; mb RECORD; st RECORD; v_loss FLOAT8 := 0; v_ntok BIGINT := 0;
        v_params BIGINT[]; v_grads BIGINT[]; v_norm FLOAT8; v_coef FLOAT8; v_lr FLOAT8; v_name TEXT;
        v_log llm_train_log; v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT;
    """, "BEGIN\n" + textwrap.indent(textwrap.dedent(STEP).strip("\n"), "  ") + textwrap.dedent(SHORT_CONTEXT))
    return function("llm_train_step", f"model TEXT, dataset TEXT, batch_size INT DEFAULT {DEFAULTS['batch_size']}, "
                    + HYPER + f", split TEXT DEFAULT '{DEFAULTS['split']}', on_behalf_of INT DEFAULT NULL",
                    "llm_train_log", body,
                    settings=KERNEL_SETTINGS,
                    note="""One optimizer step (AdamW, clip, warmup+cosine lr, dropout) on a seeded mini-batch
                    of llm_dataset; returns and logs its llm_train_log row. max_steps NULL = this step.
                    on_behalf_of: the pid of the llm_train loop driving this step (internal).""")


def _guard() -> str:
    body = plpgsql("v_pid INT;", """
        IF NOT pg_try_advisory_xact_lock(hashtext('pg_llm.train'), hashtext(p_model)) THEN
          RAISE EXCEPTION 'pg_llm: model "%" is being trained by another session', p_model
            USING HINT = 'See SELECT * FROM llm_train_progress; one training run per model at a time.';
        END IF;
        v_pid := (
          @job
        );
        IF v_pid IS NOT NULL AND v_pid NOT IN (pg_backend_pid(), coalesce(p_on_behalf_of, 0)) THEN
          RAISE EXCEPTION 'pg_llm: model "%" is being trained by another session (pid %)', p_model, v_pid
            USING HINT = 'See SELECT * FROM llm_train_progress; one training run per model at a time.';
        END IF;
    """, job="""
        SELECT j.pid FROM llm_train_job AS j
        WHERE j.model = p_model
          AND EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = j.pid AND a.state = 'active')""")
    return function("llm_train_guard", "p_model TEXT, p_on_behalf_of INT DEFAULT NULL", "VOID", body,
                    note="One trainer per model: a transaction lock for the step and the live llm_train_job owner.")


def _decay() -> str:
    return function("llm_param_decays", "p_name TEXT", "BOOLEAN", """
        SELECT p_name LIKE '%.weight' AND p_name NOT LIKE '%ln\\_%' ESCAPE '\\'""",
                    language="sql", volatility="IMMUTABLE", strict=True,
                    note="Weight decay applies to matmul weights and embeddings, not to biases or LayerNorm.")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), _guard(), _decay(), _batch(), _micro(), _grads(), _step()])
