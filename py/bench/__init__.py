"""`make bench`: pg_llm against numpy (and later torch) in one run, printed as Markdown tables.

Run: `.venv/bin/python -m pg_llm.bench [--only SECTION ...] [--dsn DSN] [--runs N] [--quick]`. Without --dsn it
starts its own ephemeral cluster (py/harness) and creates a database with pg_llm installed. Every table is
printed and written to `.pg_llm/bench/<section>.md`, aligned so it can be pasted into docs/benchmarks.md.

Adding a section: a module `pg_llm.bench.<name>` with

    def run(ctx: Context) -> list[Table]

is discovered by `__main__`: sections run in the order kernels, copy, tokenizer, then the others
alphabetically, after the environment table (numpy/OpenBLAS in the client and in the server). Rules:
- use `ctx.conn` (one autocommit connection) or `ctx.connect()`; time with `ctx.measure(fn)` (warm-up
  runs, then the median of `ctx.runs` runs; `after` runs untimed cleanup) or, to compare variants,
  `ctx.compare({name: Timed(fn, before, after)})`, which interleaves them round-robin;
- create bench-only SQL objects in the schema `ctx.schema` (llm_bench; dropped at the end) and tensors
  under the model `ctx.model` or as scratch tensors you drop yourself, never truncate shared tables, so
  the bench can run against a real database with --dsn;
- honour `ctx.quick` (fewer shapes/runs) and print progress with `ctx.log()` (stderr; stdout is tables);
- `make bench` should stay within ~5 minutes: a slow section sets `OPTIONAL = True` and then only runs
  when named with --only.
A module whose `run` takes a DSN string (first parameter named `dsn` or annotated `str`, like
py/bench/tokenizer.py's `run(dsn) -> list[dict]`) is adapted: a dict with "title" and "rows" (list of dicts,
optional "notes") is one table; otherwise the dicts are the rows of one table named after the section.
A section that raises is reported on stderr and the others still run (exit status 1 at the end).
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from pg_llm.gen.emit import kernel_body
from pg_llm.kernels.doctor import blas_probe_json


@dataclass
class Table:
    """One result table: Markdown with right-aligned numeric columns; notes become a list under it."""
    title: str
    columns: list[str]
    rows: list[list[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def markdown(self) -> str:
        cells = [[fmt(c) for c in row] for row in self.rows]
        numeric = [bool(self.rows) and all(r[i] is None or (isinstance(r[i], int | float) and not isinstance(
            r[i], bool)) for r in self.rows) for i in range(len(self.columns))]
        width = [max([len(h), 3] + [len(r[i]) for r in cells]) for i, h in enumerate(self.columns)]

        def line(vals: Sequence[str]) -> str:
            return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                     for v, w, num in zip(vals, width, numeric, strict=True)) + " |"
        rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                              for w, num in zip(width, numeric, strict=True)) + "|"
        out = [f"### {self.title}", "", line(self.columns), rule, *(line(r) for r in cells)]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def fmt(v: object) -> str:
    """Numbers with 3 significant digits (at least integer precision), None as a dash."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a >= 100 or a == 0:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


@dataclass
class Stats:
    """Timings of one measurement, in seconds."""
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def ms(self) -> float:
        return self.median * 1e3

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the runs were."""
        return (max(self.times) - min(self.times)) / self.median if self.median else 0.0


@dataclass
class Timed:
    """One variant for Context.compare: fn is timed; before/after run untimed around it."""
    fn: Callable[[], object]
    before: Callable[[], object] | None = None
    after: Callable[[], object] | None = None


@dataclass
class Context:
    dsn: str
    runs: int = 5
    warmup: int = 1
    quick: bool = False
    out_dir: Path = Path(".pg_llm/bench")
    schema: str = "llm_bench"
    model: str = "pg_llm_bench"
    _conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def measure(self, fn: Callable[[], object], *, runs: int | None = None, warmup: int | None = None,
                after: Callable[[], object] | None = None) -> Stats:
        """Warm-up runs, then `runs` timed runs of fn; `after` (untimed) follows every run."""
        times = []
        for i in range((self.warmup if warmup is None else warmup) + (runs or self.runs)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if after is not None:
                after()
            if i >= (self.warmup if warmup is None else warmup):
                times.append(dt)
        return Stats(times)

    def compare(self, fns: dict[str, Timed], *, runs: int | None = None) -> dict[str, Stats]:
        """Interleaved measurement of several variants (round-robin, rotated, so load spikes hit them alike):
        warm-up rounds, then `runs` rounds; `before`/`after` of each variant are not timed."""
        times: dict[str, list[float]] = {k: [] for k in fns}
        warm, names = self.warmup, list(fns)
        for i in range(warm + (runs or self.runs)):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate: no variant always first
                t = fns[name]
                if t.before is not None:
                    t.before()
                t0 = time.perf_counter()
                t.fn()
                dt = time.perf_counter() - t0
                if t.after is not None:
                    t.after()
                if i >= warm:
                    times[name].append(dt)
        return {k: Stats(v) for k, v in times.items()}

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()


def random_dataset(conn: psycopg.Connection, name: str, rows: int, block: int, vocab: int, seed: int) -> None:
    """`rows` training windows of `block` random token ids, registered like the corpus loader does (replaces
    a dataset of that name; deleting its llm_dataset_source row drops it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM llm_dataset_source WHERE dataset = %s", (name,))
        cur.execute("INSERT INTO llm_dataset_source (dataset, source_hash, tokenizer, block_size, stride, "
                    "val_fraction, documents, tokens, train_rows, val_rows, encoder, sources) VALUES "
                    "(%s, 'bench', 'gpt2', %s, %s, 0, 1, %s, %s, 0, 'random', '{}')",
                    (name, block, block, rows * block, rows))
        for i in range(rows):
            s = rng.integers(0, vocab, block + 1)
            cur.execute("INSERT INTO llm_dataset (dataset, split, tokens, targets, source_hash, pos) "
                        "VALUES (%s, 'train', %s, %s, 'bench', %s)", (name, s[:-1].tolist(), s[1:].tolist(), i))


def tables_from_dicts(section: str, result: object) -> list[Table]:
    """Adapt a legacy `run(dsn) -> list[dict]` result (see the module docstring)."""
    if isinstance(result, Table):
        return [result]
    items = list(result or [])
    if all(isinstance(t, Table) for t in items):
        return items
    if items and all(isinstance(d, dict) and "rows" in d for d in items):
        return [_dict_table(str(d.get("title", section)), d["rows"], d.get("notes", [])) for d in items]
    return [_dict_table(section, items, [])]


def _dict_table(title: str, rows: Sequence[dict], notes: Sequence[str]) -> Table:
    cols: list[str] = []
    for r in rows:
        cols += [str(k) for k in r if str(k) not in cols]
    t = Table(title, cols, notes=[str(n) for n in notes])
    for r in rows:
        t.add(*(r.get(c) for c in cols))
    return t


def server_setup_sql(schema: str) -> str:
    """The bench schema and its helper: llm_bench.blas(threads) -> JSON of blas_probe inside the server."""
    body = kernel_body(blas_probe_json, "blas_probe_json(threads)")
    return f"""
        CREATE SCHEMA IF NOT EXISTS {schema};
        CREATE OR REPLACE FUNCTION {schema}.blas(threads INT DEFAULT 0) RETURNS TEXT LANGUAGE plpython3u
        SET search_path = pg_catalog, public, llm_internal, pg_temp AS $fn$
{body}
$fn$;"""
