"""Data-parallel training over a cluster (py/api/cluster_train.py, docs/scaleout.md): llm_cluster_train_step on
1, 2 and 3 ranks (databases of the test server; 3 ranks with a batch of 5 rows, split 1 + 2 + 2), with and
without dropout, equals llm_train_step on the coordinator for one and two steps (loss, every parameter and both
moments within 1e-5), with byte-identical tiles on every rank; a failure in phase 2 on one rank, or before the
decision is recorded, commits nothing anywhere and leaves no prepared transaction; refusals touch no rank;
llm_cluster_recover resolves dangling prepared transactions as the coordinator decided."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from test_cluster import add, coordinator_db, state, tiles

from conftest import Server
from train_fixtures import run_async, snapshot, synthetic_dataset

RANKS = ("t_dp_r0", "t_dp_r1", "t_dp_r2")
HYPER = "lr => 1e-3, warmup_steps => 1, max_steps => 4, seed => 3, dropout => 0"
DROPOUT = HYPER.replace("dropout => 0", "dropout => 0.1")
ACCUM = DROPOUT + ", grad_accum => 2"
STEP = "SELECT (s).* FROM (SELECT llm_cluster_train_step(%s, 'tiny', 'ds', {b}, " + HYPER + ") AS s) AS q"
LOG = ("loss", "lr", "grad_norm", "tokens", "step")


@pytest.fixture(scope="module")
def ranks(server: Server) -> dict[str, str]:
    out = {}
    for name in RANKS:
        out[name] = server.fresh_db(name)
        with psycopg.connect(out[name], autocommit=True) as c:
            synthetic_dataset(c, "ds")  # the same rows and ids on every rank (a fresh database)
    return out


@pytest.fixture(scope="module")
def coord(server: Server, ranks: dict[str, str]) -> Iterator[psycopg.Connection]:
    """The coordinator: model 'tiny' at step 0 (synced to the ranks), clusters dp1, dp2 and dp3 of the first 1,
    2 and 3 rank databases, and the dataset (for the single-node reference)."""
    with psycopg.connect(coordinator_db(server, "t_dp_coord"), autocommit=True) as conn:
        synthetic_dataset(conn, "ds")
        for n in (1, 2, 3):
            for name in RANKS[:n]:
                add(conn, server, f"dp{n}", name)
        yield conn


def reset(coord: psycopg.Connection, ranks: dict[str, str], cluster: str) -> None:
    """The ranks of `cluster` back at the coordinator's step 0 (and no log rows of an earlier test)."""
    coord.execute("SELECT * FROM llm_cluster_sync('tiny', %s)", (cluster,))
    for dsn in ranks.values():
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("DELETE FROM llm_train_log WHERE model = 'tiny'")


_REF: dict[tuple[int, str], list[tuple[dict, dict]]] = {}


def reference(coord: psycopg.Connection, batch: int, hyper: str = HYPER) -> list[tuple[dict, dict]]:
    """Two llm_train_step steps of a copy of 'tiny' on the coordinator: (log row, parameters and moments)."""
    if (batch, hyper) not in _REF:
        coord.execute("SELECT llm_model_drop('ref') FROM llm_model WHERE name = 'ref'")
        coord.execute("SELECT llm_model_init('ref', 'tiny', seed => 1)")
        same = snapshot(coord, "ref", ("param",))
        assert all(np.array_equal(same[k], snapshot(coord, "tiny", ("param",))[k]) for k in same)
        out = []
        for _ in range(2):
            cur = coord.execute(f"SELECT (s).* FROM (SELECT llm_train_step('ref', 'ds', {batch}, {hyper}) AS s) AS q")
            row = dict(zip([d.name for d in cur.description], cur.fetchone(), strict=True))
            out.append((row, snapshot(coord, "ref")))
        _REF[batch, hyper] = out
    return _REF[batch, hyper]


def close(a: np.ndarray, b: np.ndarray, key: tuple[str, str]) -> bool:
    """Within 1e-5 absolute plus 1e-5 relative (moments 1e-6 absolute). The gradients of n ranks are the
    single-node ones summed in another float32 order; AdamW's first steps move a parameter by about lr x
    g / (|g| + eps), which turns a rounding difference of a gradient near eps into up to lr x that relative
    difference (measured with lr 1e-2: 2.7e-5 in an ln_2.weight whose gradient was 2.6e-8), hence lr 1e-3 here,
    as in the torch parity tests (test_train_step)."""
    floor = 1e-5 if key[1] == "param" else 1e-6
    return float(np.max(np.abs(a - b))) <= floor + 1e-5 * float(np.max(np.abs(b)))


def prepared(server: Server) -> list[str]:
    with psycopg.connect(server.admin_dsn) as c:
        return [r[0] for r in c.execute("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'pg_llm:%'")]


def steps(ranks: dict[str, str], n: int = 3) -> list[int]:
    out = []
    for name in RANKS[:n]:
        with psycopg.connect(ranks[name]) as c:
            out.append(c.execute("SELECT step FROM llm_model WHERE name = 'tiny'").fetchone()[0])
    return out


@pytest.mark.parametrize("n, batch, hyper", [(1, 4, HYPER), (2, 4, HYPER), (3, 5, HYPER), (2, 4, DROPOUT),
                                            (3, 5, DROPOUT), (2, 3, ACCUM)],
                         ids=["1", "2", "3", "2-dropout", "3-dropout", "2-dropout-accum"])
def test_cluster_steps_equal_single_node_steps(coord: psycopg.Connection, ranks: dict[str, str], server: Server,
                                               n: int, batch: int, hyper: str) -> None:
    """Dropout too: each rank's rows get the masks the single-node step draws for them (its first row passed
    down: the residual masks' tiles and the attention's sequence numbers are the whole batch's); and gradient
    accumulation: each rank takes its rows of every micro-batch."""
    cluster = f"dp{n}"
    reset(coord, ranks, cluster)
    for k, (want, params) in enumerate(reference(coord, batch, hyper)):
        cur = coord.execute(STEP.replace(HYPER, hyper).format(b=batch), (cluster,))
        got = dict(zip([d.name for d in cur.description], cur.fetchone(), strict=True))
        accum = 2 if "grad_accum => 2" in hyper else 1
        assert got["step"] == k + 1 and got["tokens"] == want["tokens"] == batch * 16 * accum
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"])
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-5 * want["grad_norm"]
        assert got["lr"] == want["lr"]
        first = tiles(ranks[RANKS[0]])
        for name in RANKS[1:n]:
            assert tiles(ranks[name]) == first, f"{name} differs from rank 0 after step {k + 1}"
        with psycopg.connect(ranks[RANKS[0]]) as c:
            have = snapshot(c, "tiny")
            log = c.execute("SELECT loss, step, tokens, schedule FROM llm_train_log WHERE model = 'tiny' "
                            "AND step = %s", (k + 1,)).fetchone()
        assert log[:3] == (got["loss"], k + 1, batch * 16 * accum) and log[3] == want["schedule"]
        assert have.keys() == params.keys() and len(have) == 3 * len(snapshot(coord, "tiny", ("param",)))
        bad = [key for key in params if not close(have[key], params[key], key)]
        assert not bad, f"step {k + 1} on {n} rank(s): {bad[:5]}"
        assert prepared(server) == []
    assert steps(ranks, n) == [2] * n
    for name in RANKS[:n]:  # each step's commit deleted the gradient shares
        with psycopg.connect(ranks[name]) as c:
            assert c.execute("SELECT count(*) FROM llm_internal.llm_dp_grad").fetchone()[0] == 0


def test_refusals_touch_no_rank(coord: psycopg.Connection, ranks: dict[str, str]) -> None:
    reset(coord, ranks, "dp2")
    before = [state(ranks[name]) for name in RANKS[:2]]
    cases = [
        (STEP.format(b=1), "batch_size 1 is smaller than the 2 ranks", "at least one row"),
        (STEP.format(b=4).replace("%s", "'nope'"), 'unknown cluster "nope"', "llm_cluster_add"),
        (STEP.format(b=4).replace("'tiny'", "'nope'"), 'has no model "nope"', "llm_cluster_sync"),
    ]
    for q, msg, hint in cases:
        with pytest.raises(psycopg.Error) as e:
            coord.execute(q, ("dp2",) if "%s" in q else None)
        assert msg in str(e.value) and hint in (e.value.diag.message_hint or ""), str(e.value)
    assert [state(ranks[name]) for name in RANKS[:2]] == before
    coord.execute(STEP.format(b=4), ("dp2",))  # a step records the ranks' versions: the next one trusts them ...
    with psycopg.connect(ranks[RANKS[1]], autocommit=True) as c:  # ... unless a tile changed: rank 1 diverges
        c.execute("UPDATE llm_tile SET data = overlay(data PLACING '\\x01'::BYTEA FROM 1) WHERE tensor_id = "
                  "(SELECT id FROM llm_tensor WHERE model = 'tiny' AND name = 'ln_f.bias' AND role = 'param')")
    before = [state(ranks[name]) for name in RANKS[:2]]
    with pytest.raises(psycopg.Error) as e:
        coord.execute(STEP.format(b=4), ("dp2",))
    assert 'diverge on rank 1 of cluster "dp2"' in str(e.value), str(e.value)
    assert "llm_cluster_sync" in e.value.diag.message_hint
    assert [state(ranks[name]) for name in RANKS[:2]] == before


def test_a_failure_commits_nothing_anywhere(coord: psycopg.Connection, ranks: dict[str, str], server: Server) -> None:
    reset(coord, ranks, "dp3")
    want = reference(coord, 5)
    with psycopg.connect(server.admin_dsn, autocommit=True) as admin:  # rank 1's AdamW fails (phase 2)
        admin.execute(f"ALTER DATABASE {RANKS[1]} SET pg_llm.adamw_chunk_floats = 'broken'")
    try:
        with pytest.raises(psycopg.Error) as e:
            coord.execute(STEP.format(b=5), ("dp3",))
        assert "broken" in str(e.value) and 'rank 1 of cluster "dp3"' in (e.value.diag.message_detail or "")
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {RANKS[1]} RESET pg_llm.adamw_chunk_floats")
    assert steps(ranks) == [0, 0, 0] and prepared(server) == []
    # every rank prepared, then the decision cannot be recorded (the loopback connection fails): all roll back
    coord.execute("SET pg_llm.loopback = $$options='-c default_transaction_read_only=on'$$")
    try:
        with pytest.raises(psycopg.Error) as e:
            coord.execute(STEP.format(b=5), ("dp3",))
        assert "read-only" in str(e.value), str(e.value)
    finally:
        coord.execute("RESET pg_llm.loopback")
    assert steps(ranks) == [0, 0, 0] and prepared(server) == []
    with psycopg.connect(ranks[RANKS[2]], autocommit=True) as c:  # rank 2's dataset differs: refused after phase 1
        saved = c.execute("SELECT id, targets FROM llm_dataset WHERE dataset = 'ds'").fetchall()
        c.execute("UPDATE llm_dataset SET targets = tokens WHERE dataset = 'ds'")
        try:
            with pytest.raises(psycopg.Error) as e:
                coord.execute(STEP.format(b=5), ("dp3",))
            assert "drew different rows" in str(e.value) and "row ids" in e.value.diag.message_hint
        finally:
            for i, targets in saved:
                c.execute("UPDATE llm_dataset SET targets = %s WHERE id = %s", (targets, i))
    assert steps(ranks) == [0, 0, 0] and prepared(server) == []
    got = coord.execute(STEP.format(b=5), ("dp3",)).fetchone()  # and the step runs as if nothing happened
    assert steps(ranks) == [1, 1, 1] and abs(got[2] - want[0][0]["loss"]) <= 1e-5 * want[0][0]["loss"]
    with psycopg.connect(ranks[RANKS[2]]) as c:
        have = snapshot(c, "tiny")
    assert all(close(have[k], want[0][1][k], k) for k in want[0][1])


def test_recover_resolves_dangling_prepared_transactions(coord: psycopg.Connection, ranks: dict[str, str],
                                                         server: Server) -> None:
    reset(coord, ranks, "dp2")
    undecided, decided = "pg_llm:dp2:7:1:0123456789ab:tiny", "pg_llm:dp2:7:0:0123456789ab:tiny"
    for name, gid, table in ((RANKS[1], undecided, "t_dp_undecided"), (RANKS[0], decided, "t_dp_decided")):
        with psycopg.connect(ranks[name], autocommit=True) as c:
            c.execute("BEGIN")
            c.execute(f"CREATE TABLE {table} ()")
            c.execute(f"PREPARE TRANSACTION '{gid}'")
    coord.execute("INSERT INTO llm_internal.llm_dp_decision (gid, cluster, model, step) VALUES (%s, 'dp2', 'tiny', 7)",
                  (decided,))
    before = [state(ranks[name]) for name in RANKS[:2]]
    with pytest.raises(psycopg.Error) as e:  # a step refuses to run over them
        coord.execute(STEP.format(b=4), ("dp2",))
    assert "unfinished cluster step" in str(e.value) and "llm_cluster_recover('dp2')" in e.value.diag.message_hint
    assert [state(ranks[name]) for name in RANKS[:2]] == before
    rows = coord.execute("SELECT rank, gid, action FROM llm_cluster_recover('dp2') ORDER BY rank").fetchall()
    assert rows == [(0, decided, "committed"), (1, undecided, "rolled back")]
    assert prepared(server) == []
    for name, table, exists in ((RANKS[0], "t_dp_decided", True), (RANKS[1], "t_dp_undecided", False)):
        with psycopg.connect(ranks[name], autocommit=True) as c:
            assert (c.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None) == exists
            c.execute(f"DROP TABLE IF EXISTS {table}")
    assert coord.execute("SELECT count(*) FROM llm_internal.llm_dp_decision").fetchone()[0] == 0
    assert coord.execute("SELECT count(*) FROM llm_cluster_recover('dp2')").fetchone()[0] == 0
    coord.execute(STEP.format(b=4), ("dp2",))
    assert steps(ranks, 2) == [1, 1]


RUN = "CALL llm_cluster_train_run('dp2', 'tiny', {steps}{args})"


def sessions(server: Server, cluster: str) -> set[tuple[str, int]]:
    """The coordinator's sessions on the ranks of `cluster` (llm_dp_open names them), as (application_name, pid)."""
    with psycopg.connect(server.admin_dsn) as c:
        return set(c.execute("SELECT application_name, pid FROM pg_stat_activity WHERE application_name LIKE %s",
                             (f"pg_llm {cluster}/%",)).fetchall())


def test_the_loop_equals_its_steps_on_one_session_per_rank(coord: psycopg.Connection, ranks: dict[str, str],
                                                           server: Server) -> None:
    """CALL llm_cluster_train_run: 1 step, then resumed to 3 with no arguments (the run's schedule, read from rank
    0's log), byte for byte the tiles of three llm_cluster_train_step calls; the resumed call's two steps ran on one
    session per rank, closed at its end; a progress NOTICE per step."""
    reset(coord, ranks, "dp2")
    for _ in range(3):
        coord.execute(STEP.format(b=4), ("dp2",))
    want = tiles(ranks[RANKS[0]])
    reset(coord, ranks, "dp2")
    notices: list[str] = []
    coord.add_notice_handler(lambda d: notices.append(d.message_primary))
    coord.execute(RUN.format(steps=1, args=", dataset => 'ds', batch_size => 4, " + HYPER))
    assert steps(ranks, 2) == [1, 1] and coord.execute("SELECT dblink_get_connections()").fetchone()[0] is None
    seen: set[tuple[str, int]] = set()
    t, out = run_async(coord.info.dsn, RUN.format(steps=3, args=""))
    while t.is_alive():
        seen |= sessions(server, "dp2")
        time.sleep(0.01)
    assert "error" not in out, out
    assert sorted(a for a, _ in seen) == ["pg_llm dp2/0", "pg_llm dp2/1"], seen  # one pid each over two steps
    assert sessions(server, "dp2") == set()
    assert steps(ranks, 2) == [3, 3]
    assert tiles(ranks[RANKS[0]]) == want and tiles(ranks[RANKS[1]]) == want
    assert [n.split(" | ")[0] for n in notices + out["notices"] if n.startswith("step ")] == \
        ["step 1/1", "step 2/3", "step 3/3"]
    with psycopg.connect(ranks[RANKS[1]]) as c:
        logged = c.execute("SELECT step, batch_size, schedule ->> 'max_steps', schedule ->> 'lr' FROM llm_train_log "
                           "WHERE model = 'tiny' ORDER BY step").fetchall()
    assert logged == [(1, 4, "4", "0.001"), (2, 4, "4", "0.001"), (3, 4, "4", "0.001")]


@pytest.mark.parametrize("args, msg, hint", [
    (", dataset => 'ds', batch_size => 1, " + HYPER, "llm_cluster_train_run: batch_size 1 is smaller than the 2",
     "at least one row"),
    (", batch_size => 4", "has no run on cluster \"dp2\" to resume", "dataset => NAME"),
    (", dataset => 'nope', batch_size => 4, " + HYPER, 'dataset "nope"', ""),
])
def test_loop_refusals_touch_no_rank_and_close_the_connections(coord: psycopg.Connection, ranks: dict[str, str],
                                                               server: Server, args: str, msg: str,
                                                               hint: str) -> None:
    reset(coord, ranks, "dp2")
    before = [state(ranks[name]) for name in RANKS[:2]]
    with pytest.raises(psycopg.Error) as e:
        coord.execute(RUN.format(steps=2, args=args))
    assert msg in str(e.value) and hint in (e.value.diag.message_hint or ""), str(e.value)
    assert [state(ranks[name]) for name in RANKS[:2]] == before
    assert coord.execute("SELECT dblink_get_connections()").fetchone()[0] is None
    assert sessions(server, "dp2") == set()


def test_cli_train(coord: psycopg.Connection, ranks: dict[str, str]) -> None:
    """pg-llm cluster train: CALL llm_cluster_train_run, its NOTICE lines on stderr, the last step on stdout."""
    reset(coord, ranks, "dp2")
    cli = str(Path(sys.executable).parent / "pg-llm")
    base = [cli, "cluster", "train", "tiny", "--name", "dp2", "--dsn", coord.info.dsn]
    p = subprocess.run([*base, "--steps", "1", "--dataset", "ds", "--batch-size", "4", "--lr", "1e-3",
                        "--warmup-steps", "1", "--max-steps", "4", "--seed", "3", "--dropout", "0"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("step 1/1 | loss ") and "step 1/1" in p.stderr
    assert steps(ranks, 2) == [1, 1]
    p = subprocess.run([*base, "--steps", "1"], capture_output=True, text=True)
    assert p.returncode == 0 and "has made 1 steps already" in p.stdout, p.stderr
    p = subprocess.run([*base[:5], "nope", *base[6:], "--steps", "2"], capture_output=True, text=True)
    assert p.returncode != 0 and 'unknown cluster "nope"' in p.stderr, p.stderr
    assert steps(ranks, 2) == [1, 1]
