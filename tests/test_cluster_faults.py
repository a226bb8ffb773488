"""Faults in the middle of a data-parallel step (py/api/cluster_train*.py, docs/scaleout.md): rank 1 of a 2-rank
cluster lives on a server of its own (a SIGKILL of a backend restarts its whole server: crash recovery), rank 0
and the coordinator on the test server. Rank 1's step is held at a lock in phase 1 (llm_dp_grad), in phase 2
(its llm_model row) or, every rank prepared, the coordinator's decision is held (llm_dp_decision); then rank 1's
backend is killed with SIGKILL, or its server stopped with pg_ctl -m immediate and started again. Before the
decision, the step is committed nowhere: every rank's catalog, tiles and step as before, no prepared transaction,
a `pg_llm: ... went away` error whose HINT names llm_cluster_recover. After it, rank 1's prepared transaction
survives the restart and llm_cluster_recover commits it. Either way, the step run again (or recovered) and the
next one reach, byte for byte, the tiles of an uninterrupted run. A rank whose database was reset, or trained on
its own, is refused until llm_cluster_sync, then steps on."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from test_cluster import add, coordinator_db, state, tiles

from pg_llm.harness.cluster import Cluster, start_ephemeral

from conftest import Server
from train_fixtures import run_async, synthetic_dataset

R0, R1 = "t_fl_r0", "t_fl_r1"
STEP = ("SELECT (s).step FROM (SELECT llm_cluster_train_step('f', 'tiny', 'ds', 4, lr => 1e-3, warmup_steps => 1, "
        "max_steps => 4, seed => 3, dropout => 0) AS s) AS q")
HOLD = {  # what keeps rank 1 (or the coordinator) waiting at a known point of the step, and who waits there
    "phase 1": ("LOCK TABLE llm_internal.llm_dp_grad IN ACCESS EXCLUSIVE MODE", "llm_dp_rank_grads"),
    "phase 2": ("SELECT 1 FROM llm_model WHERE name = 'tiny' FOR UPDATE", "llm_dp_rank_apply"),
    "decision": ("LOCK TABLE llm_internal.llm_dp_decision IN ACCESS EXCLUSIVE MODE", "llm_dp_decision"),
}


@pytest.fixture(scope="module")
def victim() -> Iterator[Cluster]:
    cluster = start_ephemeral(prefix="pg_llm_fault_")
    # a commit is in the WAL when it returns (the harness's synchronous_commit = off loses the last ~200 ms of
    # commits to an immediate stop); fsync stays off: the OS does not crash here, only PostgreSQL
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        c.execute("ALTER SYSTEM SET synchronous_commit = on")
        c.execute("SELECT pg_reload_conf()")
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def ranks(server: Server, victim: Cluster) -> dict[str, str]:
    out = {R0: server.fresh_db(R0), R1: victim.create_database(R1)}
    for dsn in out.values():
        with psycopg.connect(dsn, autocommit=True) as c:
            synthetic_dataset(c, "ds")  # the same rows and ids on both (fresh databases)
    return out


@pytest.fixture(scope="module")
def coord(server: Server, ranks: dict[str, str], victim: Cluster) -> Iterator[psycopg.Connection]:
    """The coordinator: model 'tiny' at step 0, cluster 'f' of rank 0 (here) and rank 1 (the victim's server)."""
    with psycopg.connect(coordinator_db(server, "t_fl_coord"), autocommit=True) as conn:
        add(conn, server, "f", R0)
        conn.execute("SELECT llm_cluster_add('f', '127.0.0.1', %s, %s, %s, NULL)", (victim.port, R1, victim.user))
        yield conn


def reset(coord: psycopg.Connection, ranks: dict[str, str]) -> None:
    coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'f')")
    for dsn in ranks.values():
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("DELETE FROM llm_train_log WHERE model = 'tiny'")


def prepared(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as c:
        return [r[0] for r in c.execute("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'pg_llm:%'")]


def steps(ranks: dict[str, str]) -> list[int]:
    out = []
    for dsn in ranks.values():
        with psycopg.connect(dsn) as c:
            out.append(c.execute("SELECT step FROM llm_model WHERE name = 'tiny'").fetchone()[0])
    return out


@pytest.fixture(scope="module")
def want(coord: psycopg.Connection, ranks: dict[str, str]) -> list[list[tuple]]:
    """Rank 0's tiles after one, two and three uninterrupted steps (rank 1's are the same)."""
    reset(coord, ranks)
    out = []
    for _ in range(3):
        coord.execute(STEP)
        out.append(tiles(ranks[R0]))
        assert tiles(ranks[R1]) == out[-1]
    return out


def waiting(dsn: str, query: str, timeout: float = 60) -> int:
    """The pid of the backend of dsn's server whose statement mentions `query` and waits for a lock."""
    deadline = time.time() + timeout
    with psycopg.connect(dsn, autocommit=True) as c:
        while True:
            row = c.execute("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                            (f"%{query}%",)).fetchone()
            if row:
                return row[0]
            assert time.time() < deadline, f"nothing waits in {query}"
            time.sleep(0.02)


def kill(victim: Cluster, dsn: str, pid: int) -> None:
    """SIGKILL one backend of the victim's server; returns once its crash restart let connections in again."""
    sentinel = psycopg.connect(dsn, autocommit=True)
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    try:
        while time.time() < deadline:  # the postmaster ends every other backend (this one too) before it recovers
            sentinel.execute("SELECT 1")
            time.sleep(0.02)
        raise AssertionError("the server did not restart after a SIGKILL of a backend")
    except psycopg.OperationalError:
        pass
    finally:
        sentinel.close()
    victim.wait_ready()


def stop_start(victim: Cluster, dsn: str, pid: int) -> None:
    victim.stop("immediate")
    assert not victim.is_running()
    victim.start()


FAULTS: dict[str, Callable[[Cluster, str, int], None]] = {"kill": kill, "stop": stop_start}


def assert_committed_nowhere(ranks: dict[str, str], before: list[tuple], err: BaseException | None) -> None:
    assert isinstance(err, psycopg.Error), err
    assert str(err).startswith('pg_llm: rank 1 of cluster "f" went away in the middle of a step'), str(err)
    assert "llm_cluster_recover('f')" in (err.diag.message_hint or "")
    assert [state(dsn) for dsn in ranks.values()] == before
    assert [prepared(dsn) for dsn in ranks.values()] == [[], []]


@pytest.mark.parametrize("fault", ["kill", "stop"])
@pytest.mark.parametrize("phase", ["phase 1", "phase 2"])
def test_a_rank_lost_before_the_decision_commits_nothing(coord: psycopg.Connection, ranks: dict[str, str],
                                                        victim: Cluster, want: list[list[tuple]], phase: str,
                                                        fault: str) -> None:
    reset(coord, ranks)
    before = [state(dsn) for dsn in ranks.values()]
    hold, query = HOLD[phase]
    locker = psycopg.connect(ranks[R1])
    locker.execute(hold)  # in a transaction: held until the fault ends it
    t, out = run_async(coord.info.dsn, STEP)
    try:
        FAULTS[fault](victim, ranks[R1], waiting(ranks[R1], query))
        t.join(60)
        assert not t.is_alive(), "the coordinator hangs on a lost rank"
    finally:
        locker.close()
    assert_committed_nowhere(ranks, before, out.get("error"))
    for k in range(2):  # the step again, and the next: as if nothing had happened
        assert coord.execute(STEP).fetchone()[0] == k + 1
        assert tiles(ranks[R0]) == want[k] and tiles(ranks[R1]) == want[k]
    assert [prepared(dsn) for dsn in ranks.values()] == [[], []]


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_rank_lost_after_the_decision_commits_on_recover(coord: psycopg.Connection, ranks: dict[str, str],
                                                           victim: Cluster, want: list[list[tuple]],
                                                           fault: str) -> None:
    """Every rank prepared, the coordinator records its decision (held here until rank 1 is gone): rank 0 commits,
    rank 1's prepared transaction survives its server's restart, a WARNING names llm_cluster_recover, which
    commits it there."""
    reset(coord, ranks)
    hold, query = HOLD["decision"]
    locker = psycopg.connect(coord.info.dsn)
    locker.execute(hold)
    t, out = run_async(coord.info.dsn, STEP)
    try:
        waiting(coord.info.dsn, query)
        assert len(prepared(ranks[R0])) == len(prepared(ranks[R1])) == 1  # the decision comes after every PREPARE
        with psycopg.connect(ranks[R1]) as c:
            pid = c.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_llm f/1'").fetchone()[0]
        FAULTS[fault](victim, ranks[R1], pid)
    finally:
        locker.close()  # the decision goes through: every rank had prepared
    t.join(60)
    assert not t.is_alive(), "the coordinator hangs on a lost rank"
    assert "error" not in out, out["error"]
    assert any("is committed, but COMMIT PREPARED failed on rank 1" in n for n in out["notices"]), out["notices"]
    assert steps(ranks) == [1, 0] and prepared(ranks[R0]) == []
    gid = prepared(ranks[R1])
    assert len(gid) == 1 and gid[0].startswith("pg_llm:f:1:1:")
    with pytest.raises(psycopg.Error) as e:  # no step over a prepared transaction
        coord.execute(STEP)
    assert "unfinished cluster step" in str(e.value) and "llm_cluster_recover('f')" in e.value.diag.message_hint
    assert coord.execute("SELECT rank, gid, action FROM llm_cluster_recover('f')").fetchall() == \
        [(1, gid[0], "committed")]
    assert steps(ranks) == [1, 1] and [prepared(dsn) for dsn in ranks.values()] == [[], []]
    assert tiles(ranks[R0]) == want[0] and tiles(ranks[R1]) == want[0]
    assert coord.execute(STEP).fetchone()[0] == 2
    assert tiles(ranks[R0]) == want[1] and tiles(ranks[R1]) == want[1]


def test_a_reset_or_diverged_rank_rejoins_after_a_sync(coord: psycopg.Connection, ranks: dict[str, str],
                                                       victim: Cluster, want: list[list[tuple]]) -> None:
    """Rank 1 trained on its own (another step), then its database lost (re-created empty, the dataset loaded
    again: its peer servers are gone too): each time the step refuses and names llm_cluster_sync, after which
    the cluster steps as before. First, a routed call's check and a sync right after rank 1's server restarted
    (PL/Proxy still holds a connection of this session to it, dead now)."""
    reset(coord, ranks)
    coord.execute("SELECT * FROM llm_cluster_check('f', 'tiny')")
    stop_start(victim, ranks[R1], 0)
    assert coord.execute("SELECT llm_internal.llm_cluster_ready('f', 'tiny')").fetchone()[0] == [0, 1]
    stop_start(victim, ranks[R1], 0)
    reset(coord, ranks)
    coord.execute(STEP)
    with psycopg.connect(ranks[R1], autocommit=True) as c:
        c.execute("SELECT llm_train_step('tiny', 'ds', 2, lr => 1e-2, warmup_steps => 1, dropout => 0)")
    with pytest.raises(psycopg.Error) as e:
        coord.execute(STEP)
    assert 'is at step 2 on rank 1 of cluster "f"' in str(e.value) and "llm_cluster_sync" in e.value.diag.message_hint
    reset(coord, ranks)
    assert coord.execute(STEP).fetchone()[0] == 1
    assert tiles(ranks[R0]) == want[0] and tiles(ranks[R1]) == want[0]
    victim.create_database(R1)  # the rank's database is lost and made anew
    with psycopg.connect(ranks[R1], autocommit=True) as c:
        synthetic_dataset(c, "ds")
    with pytest.raises(psycopg.Error) as e:
        coord.execute(STEP)
    assert 'has no model "tiny"' in str(e.value) and "llm_cluster_sync" in e.value.diag.message_hint
    reset(coord, ranks)
    for k in range(2):
        assert coord.execute(STEP).fetchone()[0] == k + 1
        assert tiles(ranks[R0]) == want[k] and tiles(ranks[R1]) == want[k]


def test_a_loop_that_loses_a_rank_closes_its_connections_and_resumes(coord: psycopg.Connection,
                                                                     ranks: dict[str, str], victim: Cluster,
                                                                     want: list[list[tuple]]) -> None:
    """CALL llm_cluster_train_run for 3 steps; once step 1 committed, rank 1's next step is held (phase 2) on
    the loop's own session there and that backend killed: the CALL fails with the pg_llm error, its session holds
    no dblink connection any more, the steps before stay, the lost one is nowhere; the CALL again resumes to the
    tiles of three uninterrupted steps."""
    reset(coord, ranks)
    run = ("CALL llm_cluster_train_run('f', 'tiny', 3, dataset => 'ds', batch_size => 4, lr => 1e-3, "
           "warmup_steps => 1, max_steps => 4, seed => 3, dropout => 0)")
    out: dict = {}

    def loop() -> None:
        with psycopg.connect(coord.info.dsn, autocommit=True) as c:
            try:
                c.execute(run)
            except psycopg.Error as e:
                out["error"] = e
            out["connections"] = c.execute("SELECT dblink_get_connections()").fetchone()[0]

    t = threading.Thread(target=loop)
    t.start()
    locker = psycopg.connect(ranks[R1])
    try:
        deadline = time.time() + 60
        while steps(ranks)[1] < 1:
            assert time.time() < deadline and t.is_alive(), "step 1 did not commit"
            time.sleep(0.01)
        locker.execute(HOLD["phase 2"][0])  # (after a step 2 that got there first, if one did)
        done = steps(ranks)[1]  # no later step commits on rank 1 while the lock is held
        assert done < 3
        with psycopg.connect(ranks[R1], autocommit=True) as c:
            deadline = time.time() + 60
            while not (row := c.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_llm f/1' "
                                        "AND wait_event_type = 'Lock' AND query LIKE '%llm_dp_rank_apply%'"
                                        ).fetchone()):
                assert time.time() < deadline, "the loop's session on rank 1 does not wait"
                time.sleep(0.02)
        kill(victim, ranks[R1], row[0])
        t.join(60)
        assert not t.is_alive(), "the loop hangs on a lost rank"
    finally:
        locker.close()
    err = out.get("error")
    assert isinstance(err, psycopg.Error) and 'rank 1 of cluster "f" went away' in str(err), err
    assert out["connections"] is None
    assert steps(ranks) == [done, done] and [prepared(dsn) for dsn in ranks.values()] == [[], []]
    assert tiles(ranks[R0]) == want[done - 1] and tiles(ranks[R1]) == want[done - 1]
    coord.execute("CALL llm_cluster_train_run('f', 'tiny', 3)")
    assert steps(ranks) == [3, 3]
    assert tiles(ranks[R0]) == want[2] and tiles(ranks[R1]) == want[2]
