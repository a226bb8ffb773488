"""Disk space of long training runs (api/train_space.py): the CALL loop reclaims what each step rewrites,
both loops stop cleanly before the disk fills, and the SELECT loop says what its snapshot keeps."""
from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from conftest import Server
from gpt2_fixtures import import_tiny
from train_fixtures import synthetic_dataset

ARGS = "dataset => 'ds', batch_size => 2, lr => 1e-3, warmup_steps => 2, max_steps => 20, dropout => 0.0"


@pytest.fixture(scope="module")
def model(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> str:
    synthetic_dataset(conn, "ds")
    import_tiny(conn, tmp_path_factory.mktemp("space"), "m")
    return "m"


def durable_bytes(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_total_relation_size('llm_tile_durable')").fetchone()[0]


def test_disk_free_is_the_data_directory_disk(conn: psycopg.Connection, server: Server) -> None:
    if server.cluster is None:
        pytest.skip("the server is not a local cluster of this test run: its disk is not visible from here")
    s = os.statvfs(Path(server.cluster.datadir))
    ours = conn.execute("SELECT llm_internal.llm_disk_free()").fetchone()[0]
    assert abs(ours - s.f_bavail * s.f_frsize) < 256 * 2**20  # other writers move it a little


def test_room_keeps_one_step_above_min_free_disk(conn: psycopg.Connection) -> None:
    room = "SELECT llm_internal.llm_train_room('SELECT llm_train', 5, pg_size_bytes(%s), pg_size_bytes(%s))"
    conn.execute("SET pg_llm.min_free_disk = '100MB'")
    try:
        assert conn.execute(room, ("200MB", "100MB")).fetchone()[0] is None
        msg = conn.execute(room, ("199MB", "100MB")).fetchone()[0]
        assert msg == ("pg_llm: SELECT llm_train stopped before step 6: 199 MB free on the data directory's disk, "
                       "one step took up to 100 MB, and pg_llm.min_free_disk keeps 100 MB free")
    finally:
        conn.execute("RESET pg_llm.min_free_disk")
    assert conn.execute(room, ("1025MB", "0")).fetchone()[0] is None  # default: 1GB
    assert "min_free_disk keeps 1024 MB free" in conn.execute(room, ("1023MB", "0")).fetchone()[0]


@pytest.mark.parametrize("sql", [f"SELECT llm_train('m', 3, {ARGS})", f"CALL llm_train_run('m', 3, {ARGS})"])
def test_both_loops_stop_before_the_disk_fills_and_change_nothing(conn: psycopg.Connection, model: str,
                                                                   sql: str) -> None:
    warnings: list[tuple[str, str]] = []  # a Diagnostic is only readable inside the handler
    conn.add_notice_handler(lambda d: warnings.append((d.message_primary, d.message_hint))
                            if d.severity == "WARNING" else None)
    before = conn.execute("SELECT (SELECT count(*) FROM llm_train_log), (SELECT step FROM llm_model)").fetchone()
    conn.execute("SET pg_llm.min_free_disk = '1000 TB'")
    try:
        cur = conn.execute(sql)
        if sql.startswith("SELECT"):
            assert cur.fetchone()[0] is None  # no step ran: no loss to return
    finally:
        conn.execute("RESET pg_llm.min_free_disk")
    after = conn.execute("SELECT (SELECT count(*) FROM llm_train_log), (SELECT step FROM llm_model)").fetchone()
    assert before == after
    [(message, hint)] = warnings
    assert "stopped before step 1" in message and "pg_llm.min_free_disk keeps 1000 TB free" in message
    assert "resumes at the next step" in hint


def test_call_loop_reclaims_what_each_step_rewrites(conn: psycopg.Connection, model: str) -> None:
    params = conn.execute("SELECT sum(llm_internal.llm_rows(shape)::INT8 * llm_internal.llm_cols(shape)) "
                          "FROM llm_tensor WHERE model = 'm' AND role = 'param'").fetchone()[0]
    step = conn.execute("SELECT step FROM llm_model").fetchone()[0]
    conn.execute(f"CALL llm_train_run('m', {step + 3}, {ARGS})")
    settled = durable_bytes(conn)
    conn.execute(f"CALL llm_train_run('m', {step + 11}, {ARGS})")
    # 8 more steps rewrite 8 x 12 bytes per parameter (96 x params without VACUUM); vacuumed after each step they
    # reuse the same pages, up to about one step's worth not yet reusable (measured once 1.04 x 12 x params)
    assert durable_bytes(conn) - settled < 2 * 12 * params, (settled, durable_bytes(conn), params)
    assert conn.execute("SELECT step FROM llm_model").fetchone()[0] == step + 11


def test_select_loop_says_what_its_snapshot_keeps(conn: psycopg.Connection, model: str) -> None:
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute("SELECT llm_internal.llm_train_pinned_notice('m', 0, 10)")  # a tiny model: 10 steps keep a few MB
    assert notices == []
    conn.execute("SELECT llm_internal.llm_train_pinned_notice('m', 0, 100000000)")
    [n] = notices
    assert n.startswith("pg_llm: a SELECT holds one snapshot until it returns") and "CALL llm_train_run" in n


def test_call_loop_trains_on_when_it_cannot_vacuum(conn: psycopg.Connection, model: str) -> None:
    warnings: list[str] = []
    conn.add_notice_handler(lambda d: warnings.append(d.message_primary) if d.severity == "WARNING" else None)
    step = conn.execute("SELECT step FROM llm_model").fetchone()[0]
    conn.execute("SET pg_llm.loopback = 'options=-cwork_mem=nonsense'")  # the loopback connection fails
    try:
        conn.execute(f"CALL llm_train_run('m', {step + 1}, {ARGS})")
    finally:
        conn.execute("RESET pg_llm.loopback")
    assert conn.execute("SELECT step FROM llm_model").fetchone()[0] == step + 1
    assert len(warnings) == 1 and warnings[0].startswith("pg_llm: llm_train_run cannot vacuum between steps")


def test_step_disk_estimate_is_close_to_what_a_step_writes(conn: psycopg.Connection, model: str) -> None:
    """llm_train_step_bytes (fitted on 2-4 layer models with GPT-2's vocabulary) against the growth of both
    tile partitions over one step of the tiny model, vacuumed before (FULL: nothing to reuse)."""
    conn.execute("VACUUM FULL llm_tile_scratch, llm_tile_durable")
    before = conn.execute("SELECT pg_total_relation_size('llm_tile_scratch') + "
                          "pg_total_relation_size('llm_tile_durable')").fetchone()[0]
    step = conn.execute("SELECT step FROM llm_model WHERE name = 'm'").fetchone()[0]
    conn.execute(f"SELECT llm_train_step('m', 'ds', batch_size => 8, warmup_steps => 2, max_steps => {step + 5})")
    grew = conn.execute("SELECT pg_total_relation_size('llm_tile_scratch') + "
                        "pg_total_relation_size('llm_tile_durable')").fetchone()[0] - before
    estimate = conn.execute("SELECT llm_internal.llm_train_step_need('m', 'ds', 8, 1)").fetchone()[0]
    assert 0.5 < grew / estimate < 2, (grew, estimate)


def test_a_step_too_big_for_the_disk_or_the_cap_is_refused(conn: psycopg.Connection, model: str) -> None:
    before = conn.execute("SELECT (SELECT count(*) FROM llm_train_log), (SELECT step FROM llm_model)").fetchone()
    for setting, value, match in [("pg_llm.max_step_disk", "1kB", r"writes about \d+ kB of disk, more than "
                                   r"pg_llm.max_step_disk \(1024 bytes\)"),
                                  ("pg_llm.min_free_disk", "1000 TB", "pg_llm.min_free_disk keeps 1000 TB")]:
        conn.execute(f"SET {setting} = '{value}'")
        try:
            with pytest.raises(psycopg.errors.RaiseException, match=match) as e:
                conn.execute(f"SELECT llm_train_step('m', {ARGS})")
            assert "Lower batch_size" in e.value.diag.message_hint
        finally:
            conn.execute(f"RESET {setting}")
    after = conn.execute("SELECT (SELECT count(*) FROM llm_train_log), (SELECT step FROM llm_model)").fetchone()
    assert before == after
