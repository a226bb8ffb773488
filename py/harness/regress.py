"""`make installcheck`: pg_regress over test/sql/*.sql against test/expected/*.out (the user-facing SQL contract:
errors and HINTs of bad input, GPT-2 token ids, a tiny model's logits, privileges). Seconds, no torch.

Standalone it starts an ephemeral cluster, creates a database with CREATE EXTENSION pg_llm (the installed
extension files: run `make install` first) and the GPT-2 tokenizer; tests/test_regress.py runs the same tests
on the suite's database (installed from install.sql). PG_LLM_TEST_DSN points it at an existing server."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from pg_llm.harness.cluster import PG_BIN, ROOT, start_ephemeral
from pg_llm.loader.tokenizer import ensure_gpt2

TEST_DIR = ROOT / "test"
PG_REGRESS = PG_BIN.parent / "lib/pgxs/src/test/regress/pg_regress"  # Debian: postgresql-client-15


def tests() -> list[str]:
    return sorted(p.stem for p in (TEST_DIR / "sql").glob("*.sql"))


def prepare(dsn: str, extension: bool) -> None:
    """pg_llm (CREATE EXTENSION, or already installed from install.sql) and the GPT-2 tokenizer."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if extension:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_llm CASCADE")
        ensure_gpt2(conn)


def run(dsn: str, outdir: Path, names: list[str] | None = None) -> subprocess.CompletedProcess:
    """pg_regress --use-existing on the database of dsn; diffs in outdir/regression.diffs."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    cmd = [str(PG_REGRESS), "--use-existing", f"--bindir={PG_BIN}", f"--inputdir={TEST_DIR}", f"--outputdir={outdir}",
           f"--dbname={info['dbname']}"]
    cmd += [f"--{k}={info[k]}" for k in ("host", "port", "user") if info.get(k)]
    env = {**os.environ, "PGPASSWORD": str(info.get("password", os.environ.get("PGPASSWORD", "")))}
    return subprocess.run(cmd + (names or tests()), capture_output=True, text=True, env=env)


def report(p: subprocess.CompletedProcess, outdir: Path) -> str:
    diffs = outdir / "regression.diffs"
    return p.stdout + p.stderr + (diffs.read_text() if diffs.exists() else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make installcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="tests to run (default: every test/sql/*.sql)")
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="pg_llm_regress_"))
    os.chmod(out, 0o755)
    cluster = None
    try:
        if os.environ.get("PG_LLM_TEST_DSN"):
            dsn = os.environ["PG_LLM_TEST_DSN"]
        else:
            cluster = start_ephemeral("pg_llm_regress_")
            with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE pg_llm_regress")
            dsn = cluster.dsn("pg_llm_regress")
        try:
            prepare(dsn, extension=True)
        except psycopg.errors.UndefinedFile as e:
            print(f"pg_llm: the extension is not installed: {e}\nHINT: run `make install` first.", file=sys.stderr)
            return 2
        p = run(dsn, out, args.names)
        print(report(p, out) if p.returncode else p.stdout, end="")
        return p.returncode
    finally:
        if cluster is not None:
            cluster.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
