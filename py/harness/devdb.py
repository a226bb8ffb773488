"""The persistent dev cluster behind `pg-llm db start|stop|url` (and `make db` / `make db-stop`).

It lives under .pg_llm/cluster in the project (git-ignored). As root the server runs as `postgres`, which must
traverse the project path; when it cannot (e.g. a clone under /root), the data directory goes to
/var/lib/pg_llm/<hash of the project path> and .pg_llm/cluster-dir records where."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from pg_llm.harness.cluster import ROOT, Cluster, _as_root, free_port, install_pg_llm

STATE = ROOT / ".pg_llm"
DBNAME = "pg_llm"


def _postgres_can_traverse(path: Path) -> bool:
    if not _as_root():
        return True
    return subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(path)]).returncode == 0


def _datadir() -> Path:
    marker = STATE / "cluster-dir"
    if marker.exists():
        return Path(marker.read_text().strip())
    local = STATE / "cluster"
    if _postgres_can_traverse(STATE) or not _as_root():
        d = local
    else:
        d = Path("/var/lib/pg_llm") / hashlib.sha256(str(ROOT).encode()).hexdigest()[:12] / "data"
    STATE.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(d) + "\n")
    return d


def _cluster() -> Cluster:
    port_file = STATE / "port"
    port = int(port_file.read_text()) if port_file.exists() else free_port()
    port_file.parent.mkdir(parents=True, exist_ok=True)
    port_file.write_text(f"{port}\n")
    return Cluster(datadir=_datadir(), port=port, ephemeral=False, durable=True)


def url() -> str:
    dsn_file = STATE / "dsn"
    if not dsn_file.exists():
        raise RuntimeError("no dev database yet: run `pg-llm db start` (or `make db`)")
    return dsn_file.read_text().strip()


def start(recreate: bool = False) -> str:
    """Start (initdb on first use) the dev cluster, install pg_llm into database `pg_llm`, return its URL.
    recreate=True drops the database first (every model, tokenizer and dataset in it is lost)."""
    c = _cluster()
    fresh = not (c.datadir / "PG_VERSION").exists()
    if fresh:
        if _as_root():
            c.datadir.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(c.datadir.parent, 0o755)
        c.initdb()
    if not c.is_running():
        c.start()
    changed = c.make_durable()  # a dev cluster made before pg_llm's dev clusters were durable by default
    if changed and not fresh:
        print(f"pg-llm db: turned {', '.join(changed)} on: committed training steps now survive an OS crash "
              "or power loss", file=sys.stderr)
    if fresh:
        c.prepare_template()
    with psycopg.connect(c.dsn(), autocommit=True) as conn:
        if recreate:
            conn.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DBNAME,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DBNAME}"')
    with psycopg.connect(c.dsn(DBNAME)) as conn:
        installed = conn.execute("SELECT to_regclass('llm_tensor') IS NOT NULL").fetchone()[0]
    if not installed:
        install_pg_llm(c.dsn(DBNAME))
    if not (installed and _warn_if_stale(c.dsn(DBNAME))):  # a stale schema may lack what the import needs
        _post_install(c.dsn(DBNAME))
    dsn = c.url(DBNAME)
    (STATE / "dsn").write_text(dsn + "\n")
    return dsn


def _warn_if_stale(dsn: str) -> bool:
    """The dev database keeps the pg_llm it was created with: say so when this checkout generates another."""
    from pg_llm.gen.build import build_id

    with psycopg.connect(dsn) as conn:
        has = conn.execute("SELECT to_regprocedure('llm_build()') IS NOT NULL").fetchone()[0]
        installed = conn.execute("SELECT llm_build()").fetchone()[0] if has else "(before build ids)"
    current = build_id()  # generates every module's SQL: once
    if installed != current:
        print(f"pg-llm: database {DBNAME} has pg_llm build {installed}, this checkout generates {current}: "
              "`pg-llm db start --recreate` reinstalls it (and drops the database's models, tokenizers and "
              "datasets)", file=sys.stderr)
        return True
    return False


def _post_install(dsn: str) -> None:
    """Import the GPT-2 tokenizer into the dev database when its loader is available."""
    try:
        from pg_llm.loader import tokenizer
    except ImportError:
        return
    ensure = getattr(tokenizer, "ensure_gpt2", None)
    if ensure is None:
        return
    with psycopg.connect(dsn) as conn:
        ensure(conn)


def stop() -> bool:
    c = _cluster()
    if not (c.datadir / "PG_VERSION").exists() or not c.is_running():
        return False
    c.stop("fast")
    return True
