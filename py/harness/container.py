"""PG_LLM_TEST_BACKEND=docker: PostgreSQL 15 + plpython3u + numpy + pg_llm in a container (docker/Dockerfile),
through testcontainers. Machines without a Docker engine skip this path with the reason, never silently."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from pg_llm.harness.cluster import ROOT

IMAGE = "pg_llm-test:0.1.0"


def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers; otherwise why not (the text pytest shows for the skip)."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    p = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                       timeout=30)
    if p.returncode != 0:
        first = (p.stderr or p.stdout).strip().splitlines()[:1]
        return f"no Docker engine answers `docker info` ({first[0] if first else 'exit %d' % p.returncode})"
    return None


@contextmanager
def start_container() -> Iterator[str]:
    """Build docker/Dockerfile and yield the DSN of a running container (pg_llm installed in db pg_llm)."""
    import pytest

    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(f"PG_LLM_TEST_BACKEND=docker: {reason}")
    from testcontainers.postgres import PostgresContainer

    subprocess.run(["docker", "build", "-t", IMAGE, "-f", str(ROOT / "docker" / "Dockerfile"), str(ROOT)],
                   check=True)
    with PostgresContainer(IMAGE, username="postgres", password="postgres", dbname="pg_llm",
                           driver=None) as pg:
        host, port = pg.get_container_host_ip(), pg.get_exposed_port(5432)
        yield f"host={host} port={port} user=postgres password=postgres dbname=postgres"
