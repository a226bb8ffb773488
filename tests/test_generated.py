"""Generated SQL: committed output is current, deterministic, and installs with psql and CREATE EXTENSION."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from pg_llm.gen import build
from pg_llm.gen.sqlfmt import SqlGenError, sql

from conftest import Server

ROOT = Path(__file__).resolve().parent.parent


def test_committed_sql_is_current() -> None:
    assert build.stale() == [], "run `make generate` and commit the result"


def test_built_scripts_are_current_and_not_committed() -> None:
    assert build.stale(built=True) == [], "run `make generate` (make test does)"
    tracked = subprocess.run(["git", "ls-files", *build.BUILT], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode != 0 or tracked.stdout == "", "build outputs are gitignored, not committed"


def test_generation_is_deterministic() -> None:
    assert build.outputs() == build.outputs()


def test_every_kernel_function_is_commented() -> None:
    for path in (ROOT / "sql").rglob("*.sql"):
        text = path.read_text()
        for m in re.finditer(r"(?:^|\n)((?:--[^\n]*\n)*)CREATE OR REPLACE FUNCTION (\w+)", text):
            assert m.group(1).strip(), f"{path.name}: function {m.group(2)} has no comment above it"


def test_every_api_error_says_what_to_fix() -> None:
    """Every pg_llm error the API layer (sql/api) raises carries a HINT; kernels' shape errors name the shapes."""
    bare = [(f.name, m.group(1)[:80]) for f in sorted((ROOT / "sql" / "api").glob("*.sql"))
            for m in re.finditer(r"RAISE EXCEPTION '(pg_llm[^']*)'(.*?);\n", f.read_text(), re.S)
            if "HINT" not in m.group(2)]
    assert bare == []


def test_every_api_function_is_documented() -> None:
    """docs/sql-api.md names every function of the API (surface.PUBLIC; an op's _backward goes with the op)."""
    from pg_llm.gen.surface import PUBLIC

    doc = (ROOT / "docs" / "sql-api.md").read_text()
    assert sorted(n for n in PUBLIC if not re.search(rf"\b{n.removesuffix('_backward')}\b", doc)) == []


def test_sqlfmt_refuses_what_sqlglot_cannot_parse() -> None:
    with pytest.raises(SqlGenError):
        sql("SELEC 1 FROM")
    assert sql("select a from t where b = 1") == "SELECT\n  a\nFROM t\nWHERE\n  b = 1"


def test_install_sql_with_psql(server: Server) -> None:
    if server.cluster is None:
        pytest.skip("psql -f install.sql is checked against the harness cluster only")
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS t_psql_install WITH (FORCE)")
        conn.execute("CREATE DATABASE t_psql_install")
    c = server.cluster
    p = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(c.port),
                        "-U", c.user, "-d", "t_psql_install", "-f", str(ROOT / "install.sql")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with psycopg.connect(c.dsn("t_psql_install")) as conn:
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname LIKE 'llm_%'").fetchone()[0] > 10
        assert conn.execute("SELECT llm_build()").fetchone()[0] == build.build_id()  # what db start compares


def test_create_extension(server: Server) -> None:
    sharedir = subprocess.run(["/usr/lib/postgresql/15/bin/pg_config", "--sharedir"], capture_output=True,
                              text=True).stdout.strip()
    installed = Path(sharedir, "extension", "pg_llm--0.1.0.sql")
    if not installed.exists():
        pytest.skip(f"extension files not installed in {installed.parent}: run `make install` (make setup does "
                    "it when run as root or with sudo)")
    if installed.read_text() != (ROOT / "pg_llm--0.1.0.sql").read_text():
        pytest.fail(f"{installed} is stale: run `make install`")
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS t_extension WITH (FORCE)")
        conn.execute("CREATE DATABASE t_extension")
    dsn = psycopg.conninfo.make_conninfo(server.admin_dsn, dbname="t_extension")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_llm CASCADE")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_llm'").fetchone()[0] == "0.1.0"
        assert conn.execute("SELECT llm_build()").fetchone()[0] == build.build_id()
        tid = conn.execute("SELECT llm_tensor_create('x', ARRAY[2, 2])").fetchone()[0]
        assert tid < 0
        conn.execute("DROP EXTENSION pg_llm")
        assert conn.execute("SELECT to_regclass('llm_tensor')").fetchone()[0] is None


def test_psql_is_available() -> None:
    assert shutil.which("psql"), "postgresql-client is part of make setup"
