"""Tests run against a real PostgreSQL: one ephemeral cluster per test session (py/harness), a fresh database
with pg_llm installed per test module. PG_LLM_TEST_DSN points the suite at an existing server instead;
PG_LLM_TEST_BACKEND=docker uses testcontainers (skipped with a reason where no Docker engine runs)."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pg_llm.harness.cluster import Cluster, install_pg_llm, start_ephemeral


class Server:
    """Where test databases are created: our ephemeral cluster, a DSN, or a container."""

    def __init__(self, admin_dsn: str, cluster: Cluster | None = None) -> None:
        self.admin_dsn = admin_dsn
        self.cluster = cluster

    def fresh_db(self, name: str) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        dsn = psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=name)
        install_pg_llm(dsn)
        return dsn


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    backend = os.environ.get("PG_LLM_TEST_BACKEND", "local")
    if os.environ.get("PG_LLM_TEST_DSN"):
        yield Server(os.environ["PG_LLM_TEST_DSN"])
    elif backend == "docker":
        from pg_llm.harness.container import start_container  # skips with a reason when Docker is absent

        with start_container() as dsn:
            yield Server(dsn)
    else:
        cluster = start_ephemeral()
        try:
            yield Server(cluster.dsn(), cluster)
        finally:
            cluster.destroy()


@pytest.fixture(scope="module")
def dsn(server: Server, request: pytest.FixtureRequest) -> str:
    name = "t_" + re.sub(r"\W", "_", request.module.__name__.split(".")[-1])[:50]
    return server.fresh_db(name)


@pytest.fixture(scope="module")
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """One long-lived autocommit connection per module (the first PL/Python call imports numpy, ~75 ms)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory the server's OS user (postgres, when tests run as root) can read and write."""
    d = Path(tempfile.mkdtemp(prefix="pg_llm_shared_", dir="/tmp"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def db(conn: psycopg.Connection) -> psycopg.Connection:
    """The module's connection with the GPT-2 tokenizer imported."""
    from pg_llm.loader.tokenizer import ensure_gpt2

    ensure_gpt2(conn)
    return conn


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Seeded by the test's name (crc32: stable across runs, unlike hash() of a str), so a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    """The foundation's tolerance: max abs error <= rel x the scale (max |expected|, at least 1)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


@pytest.fixture(params=["fused", "chain"])
def forward_path(request: pytest.FixtureRequest, conn: psycopg.Connection) -> Iterator[str]:
    """Both inference paths: the fused forward (ops/score.py, the default) and the kernel chain
    (pg_llm.fused_forward = off, the training forward's), each held to the same reference."""
    conn.execute("SELECT set_config('pg_llm.fused_forward', %s, FALSE)", ("on" if request.param == "fused" else "off",))
    yield request.param
    conn.execute("RESET pg_llm.fused_forward")


@pytest.fixture(params=["fused", "chain"])
def train_path(request: pytest.FixtureRequest, conn: psycopg.Connection) -> Iterator[str]:
    """Both training forwards: fused blocks and head (ops/gpt2_block.py, ops/head_nll.py, the default) and the
    per-op kernel chain (pg_llm.fused_train = off), each held to the same reference."""
    conn.execute("SELECT set_config('pg_llm.fused_train', %s, FALSE)", ("on" if request.param == "fused" else "off",))
    yield request.param
    conn.execute("RESET pg_llm.fused_train")
