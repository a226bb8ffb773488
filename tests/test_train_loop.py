"""llm_train (SELECT) and llm_train_run (CALL): per-step commits, resume = uninterrupted run, interruption
by pg_terminate_backend and by an immediate shutdown, one trainer per model, progress, clear errors."""
from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from pg_llm.harness.cluster import start_ephemeral

from gpt2_fixtures import import_tiny
from train_fixtures import run_async, same, snapshot, synthetic_dataset, wait_for_step

ARGS = "dataset => 'ds', batch_size => 2, lr => 1e-3, warmup_steps => 2, max_steps => 6, dropout => 0.1, seed => 3"


@pytest.fixture(scope="module")
def models(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("loop")
    synthetic_dataset(conn, "ds")
    for name in ("ref", "a", "b", "c"):
        import_tiny(conn, tmp, name)
    return tmp


def test_call_and_select_forms_resume_to_the_same_parameters(conn: psycopg.Connection, dsn: str, models) -> None:
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute(f"CALL llm_train_run('ref', 6, {ARGS}, eval_every => 3)")
    assert any(n.startswith("step 6/6 | loss ") and "val_loss" in n for n in notices), notices
    ref = snapshot(conn, "ref")
    # SELECT form in two calls (3 steps, then resume to 6): every value equals the uninterrupted CALL run
    assert conn.execute(f"SELECT llm_train('a', 3, {ARGS})").fetchone()[0] > 0
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'a'").fetchone()[0] == 3
    conn.execute(f"SELECT llm_train('a', 6, {ARGS})")
    assert same(snapshot(conn, "a"), ref)
    logs = conn.execute("SELECT model, step, loss, lr FROM llm_train_log WHERE model IN ('ref', 'a') "
                        "ORDER BY step, model").fetchall()
    ref_log = [(s, loss, lr) for m, s, loss, lr in logs if m == "ref"]
    assert ref_log == [(s, loss, lr) for m, s, loss, lr in logs if m == "a"] and len(ref_log) == 6
    assert conn.execute("SELECT count(*) FROM llm_train_log WHERE model = 'ref' AND val_loss IS NOT NULL"
                        ).fetchone()[0] == 2


def test_terminate_backend_mid_run_then_resume(conn: psycopg.Connection, dsn: str, models) -> None:
    ref = snapshot(conn, "ref") if conn.execute("SELECT step FROM llm_model WHERE name = 'ref'").fetchone()[0] == 6 \
        else None
    if ref is None:
        conn.execute(f"CALL llm_train_run('ref', 6, {ARGS})")
        ref = snapshot(conn, "ref")
    t, out = run_async(dsn, f"CALL llm_train_run('b', 6, {ARGS})")
    wait_for_step(conn, "b", 2)
    # a second trainer on the same model is refused while the first one runs
    with pytest.raises(psycopg.errors.RaiseException, match='model "b" is being trained by another session'):
        conn.execute(f"CALL llm_train_run('b', 6, {ARGS})")
    prog = conn.execute("SELECT running, target_step FROM llm_train_progress WHERE model = 'b'").fetchone()
    assert prog == (True, 6)
    conn.execute("SELECT pg_terminate_backend(%s)", (out["pid"],))
    t.join(60)
    assert "error" in out
    step = conn.execute("SELECT step FROM llm_model WHERE name = 'b'").fetchone()[0]
    logged = [s for (s,) in conn.execute("SELECT step FROM llm_train_log WHERE model = 'b' ORDER BY step")]
    assert 2 <= step < 6 and logged == list(range(1, step + 1))
    conn.execute(f"CALL llm_train_run('b', 6, {ARGS})")
    assert same(snapshot(conn, "b"), ref)


def test_immediate_shutdown_mid_run_then_resume(tmp_path: Path) -> None:
    """A separate, durable cluster (the dev cluster's settings; we stop it hard), a CHECKPOINT while a step
    runs: committed steps survive, resuming reaches the same parameters."""
    cluster = start_ephemeral(prefix="pg_llm_crash_", durable=True)
    try:
        dsn = cluster.create_database("crash")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT current_setting('fsync') || current_setting('full_page_writes') || "
                                "current_setting('synchronous_commit')").fetchone()[0] == "ononon"
            synthetic_dataset(conn, "ds")
            import_tiny(conn, tmp_path, "ref")
            import_tiny(conn, tmp_path, "c")
            conn.execute(f"CALL llm_train_run('ref', 12, {ARGS})")
            ref = snapshot(conn, "ref")
        lock = psycopg.connect(dsn)  # not a context manager: it is still open when the server goes down
        with psycopg.connect(dsn, autocommit=True) as conn:
            t, out = run_async(dsn, f"CALL llm_train_run('c', 12, {ARGS})")
            wait_for_step(conn, "c", 2)
            # step 4 waits on this row lock, however fast steps are: the run cannot end before the crash
            lock.execute("SELECT 1 FROM llm_model WHERE name = 'c' FOR NO KEY UPDATE")
            conn.execute("CHECKPOINT")  # while step 3 runs: its dirty tile pages are flushed mid-step
        cluster.stop("immediate")
        lock.close()
        t.join(60)
        assert "error" in out
        cluster.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            step = conn.execute("SELECT step FROM llm_model WHERE name = 'c'").fetchone()[0]
            logged = [s for (s,) in conn.execute("SELECT step FROM llm_train_log WHERE model = 'c' ORDER BY step")]
            assert 2 <= step < 12 and logged == list(range(1, step + 1))
            assert conn.execute("SELECT count(*) FROM llm_internal.llm_tape").fetchone()[0] == 0  # UNLOGGED: emptied
            conn.execute(f"CALL llm_train_run('c', 12, {ARGS})")
            assert same(snapshot(conn, "c"), ref)
            assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0] == 0
    finally:
        cluster.destroy()


@pytest.mark.parametrize("sql,match", [
    ("CALL llm_train_run('ref', 1, dataset => 'nope')", 'dataset "nope" has no rows in split "train"'),
    ("SELECT llm_train('ref', 1, dataset => 'ds', split => 'test')", 'dataset "ds" has no rows in split "test"'),
    ("SELECT llm_train('ghost', 1, dataset => 'ds')", 'unknown model "ghost"'),
    ("SELECT llm_train_step('ref', 'ds', batch_size => 0)", "batch_size must be between 1 and the 8 rows"),
    ("SELECT llm_eval_loss('ref', 'ds', 'val', 0)", "max_rows must be >= 1, got 0"),
    ("SELECT llm_eval_loss('ref', 'ds', 'val', -1)", "max_rows must be >= 1, got -1"),
])
def test_bad_input_changes_nothing(conn: psycopg.Connection, models, sql: str, match: str) -> None:
    before = conn.execute("SELECT (SELECT count(*) FROM llm_train_log), (SELECT sum(step) FROM llm_model)").fetchone()
    with pytest.raises(psycopg.errors.RaiseException, match=match):
        conn.execute(sql)
    after = conn.execute("SELECT (SELECT count(*) FROM llm_train_log), (SELECT sum(step) FROM llm_model)").fetchone()
    assert before == after


def test_playbook_worker_hints_are_reported(conn: psycopg.Connection, models) -> None:
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    step = conn.execute("SELECT step FROM llm_model WHERE name = 'ref'").fetchone()[0]
    conn.execute(f"SELECT llm_train('ref', {step}, dataset => 'ds', grad_workers => 4, prune_workers => 4)")
    assert any("grad_workers => 4 and prune_workers => 4 are accepted" in n for n in notices)


def test_progress_reads_well(conn: psycopg.Connection, models) -> None:
    """tokens/s with one decimal, the ETA in whole seconds (it showed 10119:10:57.033189)."""
    conn.execute(f"SELECT llm_train('c', 2, {ARGS})")  # this module's own cluster never trains 'c' otherwise
    tok, eta, pct = conn.execute("SELECT tokens_per_s, eta, pct FROM llm_train_progress WHERE model = 'c'").fetchone()
    assert tok > 0 and tok.as_tuple().exponent == -1
    assert eta is not None and eta.microseconds == 0 and pct == 100


@pytest.mark.parametrize("call", ["SELECT llm_train", "CALL llm_train_run"])
def test_a_failing_first_step_leaves_no_claim(conn: psycopg.Connection, models, call: str) -> None:
    """A first step that fails at run time (arguments are checked before, this is the data) takes the loop's
    claim with it: llm_train_progress shows nothing new, no step, no log."""
    if not conn.execute("SELECT 1 FROM llm_dataset WHERE dataset = 'ragged'").fetchone():
        synthetic_dataset(conn, "ragged")
        conn.execute("UPDATE llm_dataset SET tokens = tokens[1:8], targets = targets[1:8] WHERE id = "
                     "(SELECT min(id) FROM llm_dataset WHERE dataset = 'ragged' AND split = 'train')")
    import_tiny(conn, models, "fails")
    with pytest.raises(psycopg.errors.RaiseException, match="rows of different lengths"):
        conn.execute(f"{call}('fails', 3, dataset => 'ragged', batch_size => 8, warmup_steps => 1)")
    assert conn.execute("SELECT count(*) FROM llm_train_job WHERE model = 'fails'").fetchone()[0] == 0
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'fails'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM llm_train_log WHERE model = 'fails'").fetchone()[0] == 0


def test_a_resumed_run_keeps_its_schedule(conn: psycopg.Connection, models) -> None:
    """max_steps defaults to the loop's steps on a first run; resuming keeps that schedule (nanoGPT's
    lr_decay_iters): extending 3 steps to 5 runs steps 4-5 at min_lr and says so, max_steps => N stretches it."""
    import_tiny(conn, models, "sched")
    args = "dataset => 'ds', batch_size => 2, lr => 1e-3, warmup_steps => 1, dropout => 0.0, seed => 3"
    conn.execute(f"CALL llm_train_run('sched', 3, {args})")
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute(f"SELECT llm_train('sched', 5, {args})")
    conn.execute(f"SELECT llm_train('sched', 6, {args}, max_steps => 8)")
    logged = conn.execute("SELECT step, lr, (schedule ->> 'max_steps')::INT FROM llm_train_log "
                          "WHERE model = 'sched' ORDER BY step").fetchall()
    horizon = [3, 3, 3, 3, 3, 8]
    assert [m for _, _, m in logged] == horizon
    want = [conn.execute("SELECT llm_lr_at(%s, 1e-3, 1, %s, NULL)", (s, h)).fetchone()[0]
            for s, h in zip(range(1, 7), horizon, strict=True)]
    assert [lr for _, lr, _ in logged] == pytest.approx(want, rel=1e-12)
    assert logged[3][1] == logged[4][1] == pytest.approx(1e-4)  # min_lr: 0.1 x lr
    assert any('model "sched" resumes on the lr schedule it was trained with (max_steps 3)' in n for n in notices)


def test_a_resumed_run_keeps_its_arguments_unless_told(conn: psycopg.Connection, models) -> None:
    """Left out on resume, lr, batch and seed are the run's (not the defaults); passed, they change it and a
    NOTICE says what changed."""
    import_tiny(conn, models, "keep")
    conn.execute("CALL llm_train_run('keep', 2, dataset => 'ds', batch_size => 3, lr => 2e-3, warmup_steps => 1, "
                 "dropout => 0.0, seed => 9)")
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute("SELECT llm_train('keep', 3)")  # everything from the run: dataset, batch 3, lr, seed ...
    conn.execute("SELECT llm_train('keep', 4, lr => 1e-3, batch_size => 2)")
    rows = conn.execute("SELECT step, batch_size, seed, schedule ->> 'lr', schedule ->> 'max_steps' "
                        "FROM llm_train_log WHERE model = 'keep' ORDER BY step").fetchall()
    assert rows == [(1, 3, 9, "0.002", "2"), (2, 3, 9, "0.002", "2"), (3, 3, 9, "0.002", "2"),
                    (4, 2, 9, "0.001", "2")]
    changed = [n for n in notices if "resumes its run with" in n]
    assert changed == ['pg_llm: model "keep" resumes its run with batch_size 2 (was 3), lr 0.001 (was 0.002)']
