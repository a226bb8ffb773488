"""Cancel, statement_timeout and pg_terminate_backend stop SELECT llm_train, including the step running in its
loopback connection (a plain dblink call used to wait for the whole step, and the loopback kept training
after its caller was gone); what was committed stays consistent and the progress view says it stopped."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from gpt2_fixtures import import_tiny
from train_fixtures import run_async, synthetic_dataset

ARGS = "dataset => 'ds', batch_size => 2, lr => 1e-3, warmup_steps => 2, dropout => 0.1, seed => 3"
STEPS = 400  # far more than any of these tests lets run


@pytest.fixture(scope="module")
def models(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cancel")
    synthetic_dataset(conn, "ds")
    for name in ("timeout", "cancel", "terminate"):
        import_tiny(conn, tmp, name)
    return tmp


@contextmanager
def step_blocked(dsn: str, model: str) -> Iterator[None]:
    """The model's row locked (FOR NO KEY UPDATE: the loop's claim still passes, a step's FOR UPDATE waits), so
    the loopback step hangs inside llm_train_step until the lock goes, however fast steps are."""
    with psycopg.connect(dsn) as lock:
        lock.execute("SELECT 1 FROM llm_model WHERE name = %s FOR NO KEY UPDATE", (model,))
        timer = threading.Timer(30, lock.rollback)  # were the step not stoppable: release it, the test fails
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            lock.rollback()


def loopback_steps(conn: psycopg.Connection) -> int:
    """Backends still running a training step for somebody else."""
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
                        "AND query LIKE '%llm_train_step(%'").fetchone()[0]


def wait_for_loopback(conn: psycopg.Connection) -> None:
    """Until the loop's step is running (held by step_blocked) in its loopback backend."""
    while not loopback_steps(conn):
        time.sleep(0.05)


def stopped(conn: psycopg.Connection, model: str, within: float) -> None:
    """No loopback step runs (within `within` seconds), nothing was half-written, and the progress view agrees."""
    t0 = time.monotonic()
    while loopback_steps(conn):
        assert time.monotonic() - t0 < within, "the loopback connection is still running the step"
        time.sleep(0.05)
    step = conn.execute("SELECT step FROM llm_model WHERE name = %s", (model,)).fetchone()[0]
    logged = [s for (s,) in conn.execute("SELECT step FROM llm_train_log WHERE model = %s ORDER BY step", (model,))]
    assert logged == list(range(1, step + 1))
    progress = conn.execute("SELECT running FROM llm_train_progress WHERE model = %s", (model,)).fetchone()
    assert progress is None if step == 0 else progress == (False,)  # a first step's claim goes with it


def test_statement_timeout_stops_the_select_loop(conn: psycopg.Connection, dsn: str, models: Path) -> None:
    with step_blocked(dsn, "timeout"), psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET statement_timeout = '2s'")
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            c.execute(f"SELECT llm_train('timeout', {STEPS}, {ARGS})")
        assert time.monotonic() - t0 < 6
        stopped(conn, "timeout", within=3)


def test_cancel_stops_the_select_loop(conn: psycopg.Connection, dsn: str, models: Path) -> None:
    with step_blocked(dsn, "cancel"):
        t, out = run_async(dsn, f"SELECT llm_train('cancel', {STEPS}, {ARGS})")
        wait_for_loopback(conn)
        conn.execute("SELECT pg_cancel_backend(%s)", (out["pid"],))
        t.join(5)
        assert not t.is_alive() and isinstance(out.get("error"), psycopg.errors.QueryCanceled), out
        stopped(conn, "cancel", within=3)


def test_terminating_the_caller_stops_its_loopback(conn: psycopg.Connection, dsn: str, models: Path) -> None:
    with step_blocked(dsn, "terminate"):
        t, out = run_async(dsn, f"SELECT llm_train('terminate', {STEPS}, {ARGS})")
        wait_for_loopback(conn)
        conn.execute("SELECT pg_terminate_backend(%s)", (out["pid"],))
        t.join(5)
        assert not t.is_alive() and "error" in out
        stopped(conn, "terminate", within=5)  # client_connection_check_interval = 1 s in the loopback session


@pytest.mark.parametrize("loop", ["CALL llm_train_run", "SELECT llm_train"])
def test_a_cancelled_loop_says_so_in_a_few_lines(dsn: str, models: Path, loop: str) -> None:
    """The CONTEXT of a cancel inside a step names the functions, not the generated statement it hit (a kernel's
    INSERT ... SELECT used to fill ~35 lines)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET statement_timeout = '1500ms'")
        with pytest.raises(psycopg.errors.QueryCanceled) as e:
            c.execute(f"{loop}('cancel', {STEPS}, {ARGS})")
    context = e.value.diag.context or ""
    assert len(context.splitlines()) <= 6 and "INSERT INTO" not in context and "format(" not in context, context
