"""The harness: ephemeral clusters as root (through runuser) and as a normal user, the DSN override, and the
Docker path (skipped with its reason where no engine runs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pg_llm.harness.cluster import _make_accessible, start_ephemeral
from pg_llm.harness.container import docker_unavailable_reason

from conftest import Server

ROOT = Path(__file__).resolve().parent.parent


def test_session_cluster_settings(server: Server) -> None:
    if server.cluster is None:
        pytest.skip("PG_LLM_TEST_DSN/docker: not our cluster")
    c = server.cluster
    with psycopg.connect(server.admin_dsn) as conn:
        settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN ('fsync', "
                                     "'synchronous_commit', 'full_page_writes', 'unix_socket_directories', "
                                     "'listen_addresses', 'server_version_num')").fetchall())
    assert settings["fsync"] == "off" and settings["synchronous_commit"] == "off"
    assert settings["full_page_writes"] == "off" and settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_directories"] == str(c.socket_dir)
    assert settings["server_version_num"].startswith("15")
    owner = c.datadir.stat().st_uid
    assert owner == (int(subprocess.check_output(["id", "-u", "postgres"])) if os.geteuid() == 0 else os.geteuid())


def test_dev_cluster_settings_are_durable() -> None:
    """pg-llm db start's cluster: fsync, full_page_writes and synchronous_commit on (make_durable turns them on
    in a dev cluster made with the fast settings); the test clusters keep the fast ones."""
    from pg_llm.harness import devdb

    assert devdb._cluster().durable
    c = start_ephemeral(prefix="pg_llm_durable_")
    try:
        assert sorted(c.make_durable()) == ["fsync", "full_page_writes", "synchronous_commit"]
        assert c.make_durable() == []
        with psycopg.connect(c.dsn()) as conn:
            assert conn.execute("SELECT array_agg(setting ORDER BY name) FROM pg_settings WHERE name IN "
                                "('fsync', 'full_page_writes', 'synchronous_commit')").fetchone()[0] == ["on"] * 3
    finally:
        c.destroy()


def test_ephemeral_cluster_is_removed() -> None:
    c = start_ephemeral(prefix="pg_llm_rm_")
    base = c.datadir.parent
    with psycopg.connect(c.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    c.destroy()
    assert not base.exists()


SNIPPET = """
import psycopg
from pg_llm.harness.cluster import _make_accessible, start_ephemeral
c = start_ephemeral(prefix="pg_llm_user_")
try:
    dsn = c.create_database("u")
    with psycopg.connect(dsn) as conn:
        rows = dict((k, v) for k, v, _ in conn.execute("SELECT * FROM llm_doctor()"))
    print("OK", rows["numpy"])
finally:
    c.destroy()
"""


def test_cluster_as_normal_user() -> None:
    """As root, run the harness as the unprivileged postgres user: it must initdb/pg_ctl directly."""
    if os.geteuid() != 0:
        p = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, cwd="/")
    else:
        # the unprivileged user must traverse the directories above the checkout (a clone under a 0700
        # mkdtemp dir would hide it): grant traverse (o+x) only, as the harness does for cluster directories
        _make_accessible(ROOT / ".venv")
        probe = subprocess.run(["runuser", "-u", "postgres", "--", sys.executable, "-c", "import pg_llm"],
                               capture_output=True, text=True, cwd="/")
        assert probe.returncode == 0, f"user postgres cannot run the project venv: {probe.stderr[-300:]}"
        p = subprocess.run(["runuser", "-u", "postgres", "--", sys.executable, "-c", SNIPPET],
                           capture_output=True, text=True, cwd="/")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("OK ")


def test_dsn_override_runs_the_suite_on_another_server(server: Server) -> None:
    """PG_LLM_TEST_DSN points the whole suite at an existing server (here: our session cluster)."""
    if server.cluster is None:
        pytest.skip("already running against PG_LLM_TEST_DSN/docker")
    env = dict(os.environ, PG_LLM_TEST_DSN=server.admin_dsn)
    p = subprocess.run([str(Path(sys.executable).parent / "pytest"), "-q", "-p", "no:cacheprovider",
                        "tests/test_storage.py::test_tile_values_as_float4"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout


def test_docker_backend() -> None:
    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(f"docker backend: {reason}")
    env = dict(os.environ, PG_LLM_TEST_BACKEND="docker")
    p = subprocess.run([str(Path(sys.executable).parent / "pytest"), "-q", "-p", "no:cacheprovider",
                        "tests/test_storage.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dev_database_built_from_another_checkout_is_reported(server: Server,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pg_llm.gen.build import build_id
    from pg_llm.harness import devdb

    dsn = server.fresh_db("t_harness_build")
    assert devdb._warn_if_stale(dsn) is False
    assert capsys.readouterr().err == ""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION llm_build() RETURNS TEXT LANGUAGE sql AS $$ SELECT 'older' $$")
    assert devdb._warn_if_stale(dsn) is True
    err = capsys.readouterr().err
    assert f"has pg_llm build older, this checkout generates {build_id()}" in err
    assert "pg-llm db start --recreate" in err
