"""Bench section `cluster`: data-parallel training loops (CALL llm_cluster_train_run, docs/scaleout.md) on 1, 2 and
4 ranks of this machine against CALL llm_train_run on one node, same run, and a scaling model for N machines.

The ranks are databases of two ephemeral servers the section starts on loopback: one whose backends run OpenBLAS
with 1 thread, one with 2 (PG_LLM_BLAS_THREADS), so that "2 ranks x 1 thread" and "1 rank x 2 threads" use the
same 2 cores. The coordinator is the bench database. Per configuration: a sync, then CALL llm_cluster_train_run of
1 + `runs` steps (its connections, and so the ranks' weight caches, serve every step), against CALL llm_train_run on
one node; the ranks track their functions, so each step splits into phase 1 (forward + backward of
the rank's rows, gradient tiles committed), the gradient exchange (every rank pulls the others' tiles through
dblink and adds them: llm_mk_dp_sum) and the rest of phase 2 (norm, AdamW, checksum, prepare, commit).

Bytes moved per step are counted from the data layout (what llm_dp_grad holds: 4 bytes per parameter per rank,
pulled by every other rank; dblink sends bytea as hex text, 2 characters a byte).
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pg_llm.bench import Context, Table, random_dataset
from pg_llm.bench.loop import CONFIG, step_gaps
from pg_llm.harness.cluster import Cluster, start_ephemeral

OPTIONAL = False
T, BATCH = 128, 8
HP = "lr => 6e-4, warmup_steps => 2, max_steps => 100, dropout => 0, seed => 1"
# (label, ranks, BLAS threads of the rank servers); 1 rank x 2 threads is the single node's setting
SETUPS = (("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1), ("2 ranks x 2 threads", 2, 2),
          ("4 ranks x 1 thread", 4, 1))
PHASES = ("llm_dp_rank_grads", "llm_mk_dp_sum", "llm_dp_rank_apply")
NETWORKS = (("loopback (measured)", None), ("1 Gbit/s", 125e6), ("10 Gbit/s", 1.25e9))


@contextmanager
def _servers() -> Iterator[dict[int, Cluster]]:
    """Ephemeral servers for the ranks, by BLAS threads of their backends."""
    out: dict[int, Cluster] = {}
    saved = os.environ.get("PG_LLM_BLAS_THREADS")
    try:
        for threads in sorted({s[2] for s in SETUPS}):
            os.environ["PG_LLM_BLAS_THREADS"] = str(threads)
            out[threads] = start_ephemeral(f"pg_llm_bench_ranks{threads}_")
        yield out
    finally:
        if saved is None:
            os.environ.pop("PG_LLM_BLAS_THREADS", None)
        else:
            os.environ["PG_LLM_BLAS_THREADS"] = saved
        for c in out.values():
            c.destroy()


def _rank_dbs(server: Cluster, n: int) -> list[str]:
    """n fresh rank databases on server, each with the dataset (the same rows and ids) and tracked functions."""
    dbs = [f"bench_rank{r}" for r in range(n)]
    for db in dbs:
        with psycopg.connect(server.create_database(db), autocommit=True) as c:
            random_dataset(c, "bench_dp", 4 * BATCH, T, CONFIG["vocab_size"], 0)
            c.execute(f'ALTER DATABASE "{db}" SET track_functions = \'all\'')
    return dbs


def _phase_seconds(server: Cluster, dbs: list[str]) -> dict[str, float]:
    """The slowest rank's seconds per function of PHASES since the last reset, and reset them."""
    out = dict.fromkeys(PHASES, 0.0)
    for db in dbs:
        with psycopg.connect(server.dsn(db), autocommit=True) as c:
            deadline = time.time() + 10  # a backend reports its statistics as it exits: wait for the step's
            while time.time() < deadline and c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'").fetchone()[0]:
                time.sleep(0.05)
            for name, ms in c.execute("SELECT funcname, total_time FROM pg_stat_user_functions "
                                      "WHERE funcname = ANY(%s)", (list(PHASES),)).fetchall():
                out[name] = max(out[name], ms / 1e3)
            c.execute("SELECT pg_stat_reset()")
    return out


def _run_setup(ctx: Context, server: Cluster, n: int, threads: int, runs: int) -> dict[str, float]:
    conn, cluster = ctx.conn, f"bench_{n}_{threads}"
    dbs = _rank_dbs(server, n)
    conn.execute("SELECT llm_cluster_drop(%s) WHERE EXISTS (SELECT 1 FROM llm_cluster_ranks WHERE cluster = %s)",
                 (cluster, cluster))
    for db in dbs:
        conn.execute("SELECT llm_cluster_add(%s, '127.0.0.1', %s, %s, %s)", (cluster, server.port, db, server.user))
    t0 = time.perf_counter()
    conn.execute("SELECT * FROM llm_cluster_sync(%s, %s)", (ctx.model + "_dp", cluster))
    sync = time.perf_counter() - t0
    _phase_seconds(server, dbs)
    conn.execute(f"CALL llm_cluster_train_run(%s, %s, {1 + runs}, dataset => 'bench_dp', batch_size => {BATCH}, "
                 f"{HP})", (cluster, ctx.model + "_dp"))
    phases = _phase_seconds(server, dbs)
    with psycopg.connect(server.dsn(dbs[0])) as c:
        step = _warm_step(c, ctx.model + "_dp")
    conn.execute("SELECT llm_cluster_drop(%s)", (cluster,))
    return {"step": step, "sync": sync, **{k: v / (1 + runs) for k, v in phases.items()}}


def _warm_step(conn: psycopg.Connection, model: str) -> float:
    """Median seconds between a loop's committed steps after its first: a step, its commit and the loop's VACUUM,
    with warm backends."""
    return statistics.median(step_gaps(conn, model))


def _single(ctx: Context, runs: int) -> float:
    model = ctx.model + "_single"
    ctx.conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
    ctx.conn.execute("SELECT llm_model_init(%s, %s, seed => 1)", (model, ctx.model + "_cfg"))
    ctx.conn.execute(f"CALL llm_train_run(%s, {1 + runs}, dataset => 'bench_dp', batch_size => {BATCH}, {HP})",
                     (model,))
    step = _warm_step(ctx.conn, model)
    ctx.conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
    return step


def run(ctx: Context) -> list[Table]:
    runs = 2 if ctx.quick else 4
    conn, cfg, model = ctx.conn, ctx.model + "_cfg", ctx.model + "_dp"
    conn.execute("CREATE EXTENSION IF NOT EXISTS plproxy")
    conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) VALUES "
                 "(%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING", (cfg, *CONFIG.values()))
    conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
    conn.execute("SELECT llm_model_init(%s, %s, seed => 1)", (model, cfg))
    random_dataset(conn, "bench_dp", 4 * BATCH, T, CONFIG["vocab_size"], 0)
    params = int(conn.execute("SELECT sum(shape[1]::BIGINT * coalesce(shape[2], 1)) FROM llm_tensor "
                              "WHERE model = %s AND role = 'param'", (model,)).fetchone()[0])
    ctx.log("cluster: single node")
    single = _single(ctx, runs)
    rows: list[tuple[str, int, dict[str, float]]] = []
    try:
        with _servers() as servers:
            for label, n, threads in SETUPS:
                ctx.log(f"cluster: {label}")
                rows.append((label, n, _run_setup(ctx, servers[threads], n, threads, runs)))
    finally:
        conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
        conn.execute("DELETE FROM llm_dataset_source WHERE dataset = 'bench_dp'")
    return _tables(params, single, rows, runs)


def _tables(params: int, single: float, rows: list[tuple[str, int, dict[str, float]]], runs: int) -> list[Table]:
    share = 4 * params  # bytes of one rank's gradient share
    t = Table(f"Data-parallel steps on this machine, batch {BATCH} x {T} tokens, {params / 1e6:.1f}M parameters",
              ["ranks", "step s", "x one node", "tokens/s", "phase 1 s", "exchange s", "rest of phase 2 s",
               "MB pulled per rank", "exchange MB/s", "sync s"])
    t.add("one node (CALL llm_train_run, 2 threads)", single, 1.0, BATCH * T / single, None, None, None, 0, None, None)
    rate = None
    for label, n, r in rows:
        pulled = (n - 1) * share
        mbps = pulled / r["llm_mk_dp_sum"] / 1e6 if n > 1 and r["llm_mk_dp_sum"] > 0 else None
        rate = mbps or rate
        t.add(label, r["step"], r["step"] / single, BATCH * T / r["step"], r["llm_dp_rank_grads"],
              r["llm_mk_dp_sum"], r["llm_dp_rank_apply"] - r["llm_mk_dp_sum"], pulled / 1e6, mbps, r["sync"])
    t.notes += [
        f"CALL llm_cluster_train_run (one node: CALL llm_train_run) of {1 + runs} steps: step s is the median time "
        "between committed steps after the first (step, commit, the loop's VACUUM); phase columns are the slowest "
        "rank's seconds per step over the whole loop, its cold first step included (pg_stat_user_functions on the "
        "ranks). Ranks are databases "
        "of loopback servers on this 2-core machine: more ranks than cores share them, so this table measures "
        "overheads, not a speed-up.",
        f"Bytes: each rank writes its gradient share (4 x {params / 1e6:.1f}M = {share / 1e6:.0f} MB) and pulls the "
        "other n - 1 shares through dblink, as hex text (twice the bytes on the wire); n (n - 1) shares move per "
        "step in all."]
    return [t, _model(params, rows, rate)]


def _model(params: int, rows: list[tuple[str, int, dict[str, float]]], loop_rate: float | None) -> Table:
    """Step time on N machines (one rank each, 2 cores) = phase 1 of B / N rows + pulling (N - 1) shares + the
    rest of phase 2, from the 1-rank run's measurements."""
    one = next(r for label, n, r in rows if n == 1)
    per_row = one["llm_dp_rank_grads"] / BATCH
    rest = one["llm_dp_rank_apply"] - one["llm_mk_dp_sum"]
    t = Table("Scaling model: one rank per 2-core machine, the same global batch",
              ["network", *(f"N = {n}" for n in (1, 2, 4, 8))])
    for name, bw in NETWORKS:
        rate = (loop_rate * 1e6 if loop_rate else None) if bw is None else bw / 2  # hex doubles the wire bytes
        if rate is None:
            continue
        cells = []
        for n in (1, 2, 4, 8):
            step = per_row * -(-BATCH // n) + (n - 1) * 4 * params / rate + rest
            cells.append(f"{step:.2f} s ({one['step'] / step:.2f}x)" if n > 1 else f"{step:.2f} s")
        t.add(name, *cells)
    t.notes += [
        f"Assumed: phase 1 scales with a rank's rows ({per_row:.3f} s a row of {T} tokens, measured on 1 rank); "
        f"every rank pulls the other N - 1 shares ({4 * params / 1e6:.0f} MB each) one after another at the "
        "network's rate, halved by dblink's hex encoding (loopback: the rate the exchange measured above); the "
        f"rest of phase 2 (norm, AdamW on every parameter, checksum, commit: {rest:.2f} s) does not shrink with N. "
        "Speed-up in parentheses: against the measured 1-rank step of the table above.",
        "Not modeled: rank-to-rank contention on a shared switch, stragglers, and the coordinator's round trips "
        "(milliseconds)."]
    return t
