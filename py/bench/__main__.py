"""`make bench` entry point: runs the bench sections and prints Markdown tables (see pg_llm.bench)."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from types import ModuleType

import numpy as np

from pg_llm import bench
from pg_llm.bench import Context, Table, server_setup_sql, tables_from_dicts
from pg_llm.harness.cluster import ROOT, start_ephemeral
from pg_llm.kernels.doctor import blas_probe

ORDER = ("kernels", "copy", "tokenizer")  # built-in order; other modules follow alphabetically


def available() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def run_section(name: str, mod: ModuleType, ctx: Context) -> list[Table]:
    params = list(inspect.signature(mod.run).parameters.values())
    legacy = params and (params[0].name == "dsn" or params[0].annotation in (str, "str"))
    return tables_from_dicts(name, mod.run(ctx.dsn) if legacy else mod.run(ctx))


def _blas_row(info: dict) -> list[str]:
    env = ", ".join(f"{k}={v}" for k, v in sorted(info.get("env", {}).items())) or "(none set)"
    return [info.get("numpy", "?"), info.get("error") or f"{info.get('core', '?')}, {info.get('threads', '?')} "
            f"threads", info.get("config", "?"), env]


def env_table(ctx: Context) -> Table:
    conn = ctx.conn
    conn.execute(server_setup_sql(ctx.schema))
    server = json.loads(conn.execute(f"SELECT {ctx.schema}.blas(0)").fetchone()[0])
    client = blas_probe()
    try:
        from threadpoolctl import threadpool_info  # optional; not a pg_llm dependency

        pools = "; ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} "
                          f"{p.get('num_threads')} threads" for p in threadpool_info())
    except ImportError:
        pools = "threadpoolctl not installed: OpenBLAS queried through ctypes"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        built = f"{blas.get('name')} {blas.get('version')}"
    except Exception as e:  # noqa: BLE001 - np.show_config's layout is not a stable API
        built = f"unknown ({e})"
    pg, jit, sb, wal = conn.execute(
        "SELECT current_setting('server_version'), pg_jit_available(), current_setting('shared_buffers'), "
        "concat_ws(' / ', current_setting('min_wal_size'), current_setting('max_wal_size'), "
        "current_setting('wal_buffers'))").fetchone()
    t = Table("Environment", ["item", "client (.venv)", "server (plpython3u)"])
    for label, c, s in zip(("numpy", "OpenBLAS core, threads", "OpenBLAS build", "OpenBLAS/OMP env"),
                           _blas_row(client), _blas_row(server), strict=True):
        t.add(label, c, s)
    t.add("np.show_config blas", built, "same wheel" if server.get("numpy") == client.get("numpy") else "?")
    t.add("threadpoolctl", pools, "-")
    t.add("PostgreSQL, JIT available", "-", f"{pg}, {jit}")
    t.add("shared_buffers, min / max_wal_size / wal_buffers", "-", f"{sb}, {wal}")
    t.add("cores, load average", f"{os.cpu_count()}, {' '.join(f'{x:.2f}' for x in os.getloadavg())}", "-")
    t.notes.append(f"{datetime.now():%Y-%m-%d %H:%M}; median of {ctx.runs} runs after {ctx.warmup} warm-up; "
                   "other processes share the cores, so compare ratios measured in the same run.")
    return t


def write(ctx: Context, name: str, tables: list[Table], docs: Path | None) -> None:
    text = "".join(t.markdown() + "\n" for t in tables)
    print(text, flush=True)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"make bench ({name}), {datetime.now():%Y-%m-%d %H:%M}"
    (ctx.out_dir / f"{name}.md").write_text(f"<!-- {stamp} -->\n\n" + text)
    if docs is not None:
        update_docs(docs, name, f"_{stamp}_\n\n" + text)


def update_docs(docs: Path, name: str, text: str) -> None:
    """Put a section's tables into docs/benchmarks.md between its markers (appended the first time), so the
    document always holds the latest full run of every section, dated, beside the environment it ran in."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    doc = docs.read_text() if docs.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    docs.write_text(doc)


def cleanup(ctx: Context) -> None:
    try:
        ctx.conn.execute(f"DROP SCHEMA IF EXISTS {ctx.schema} CASCADE")
        ctx.conn.execute("DELETE FROM llm_tensor WHERE model = %s", (ctx.model,))
    except Exception as e:  # noqa: BLE001 - best effort at the end of a run
        ctx.log(f"cleanup failed: {e}")
    ctx.close()


def main(argv: list[str] | None = None) -> int:
    names = available()
    p = argparse.ArgumentParser(prog="python -m pg_llm.bench", description=__doc__ + " Sections: "
                                + ", ".join(names) + " (the environment table is always printed).")
    p.add_argument("--only", action="append", metavar="SECTION", choices=names,
                   help="run only this section (repeatable)")
    p.add_argument("--dsn", help="use this database (pg_llm installed) instead of an ephemeral cluster")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and runs (a smoke test of the bench)")
    p.add_argument("--out", type=Path, default=ROOT / ".pg_llm" / "bench", help="where <section>.md go")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md",
                   help="the document whose sections a full run (not --quick) updates (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="leave the document alone")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(names))
        return 0
    cluster = None
    dsn = args.dsn
    if dsn is None:
        print("[bench] starting an ephemeral PostgreSQL cluster", file=sys.stderr, flush=True)
        cluster = start_ephemeral("pg_llm_bench_")
        try:
            dsn = cluster.create_database("pg_llm_bench")
        except BaseException:
            cluster.destroy()
            raise
    ctx = Context(dsn=dsn, runs=2 if args.quick else args.runs, warmup=args.warmup, quick=args.quick,
                  out_dir=args.out)
    failed = []
    docs = None if args.no_docs or args.quick else args.docs
    try:
        write(ctx, "env", [env_table(ctx)], docs)
        for name in args.only or names:
            t0 = time.perf_counter()
            ctx.log(f"section {name}")
            try:
                mod = importlib.import_module(f"pg_llm.bench.{name}")
                if getattr(mod, "OPTIONAL", False) and not args.only:
                    ctx.log(f"section {name} is optional (slow): run it with --only {name}")
                    continue
                tables = run_section(name, mod, ctx)
            except Exception:  # noqa: BLE001 - report and go on with the other sections
                traceback.print_exc()
                failed.append(name)
                ctx.close()
                continue
            write(ctx, name, tables, docs)
            ctx.log(f"section {name} took {time.perf_counter() - t0:.0f} s")
    finally:
        cleanup(ctx)
        if cluster is not None:
            cluster.destroy()
    if failed:
        print(f"[bench] failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
