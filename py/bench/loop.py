"""Training loops over many steps: CALL llm_train_run (commits and vacuums after each step) against
SELECT llm_train (one snapshot for the whole run, so PostgreSQL cannot reclaim what its steps rewrite).

For each loop: wall time per step (step + commit + VACUUM, from one step's log time to the next) and the
size on disk of the tile partitions as the run goes. A 27.5M-parameter config (4 layers, 384 wide, GPT-2's
vocabulary) keeps it to a couple of minutes. With --dsn the partitions hold that database's other tensors
too: compare the growth, not the sizes.
"""
from __future__ import annotations

import statistics
import threading
import time

import psycopg

from pg_llm.bench import Context, Table, random_dataset

OPTIONAL = False
CONFIG = dict(n_layer=4, n_head=6, n_embd=384, n_ctx=128, vocab_size=50257)
T, BATCH = 64, 1
SIZES = "SELECT pg_total_relation_size('llm_tile_durable'), pg_total_relation_size('llm_tile_scratch')"
LOOPS = {"CALL llm_train_run": "CALL llm_train_run(%s, %s, dataset => %s, batch_size => %s, dropout => 0.0)",
         "SELECT llm_train": "SELECT llm_train(%s, %s, dataset => %s, batch_size => %s, dropout => 0.0)"}


def step_gaps(conn: psycopg.Connection, model: str) -> list[float]:
    """Seconds between a loop's consecutive committed steps (llm_train_log.logged_at), from its second step on:
    a step, its commit and what the loop does between steps."""
    return [float(r[0]) for r in conn.execute(
        "SELECT extract(epoch FROM logged_at - lag(logged_at) OVER (ORDER BY step)) FROM llm_train_log "
        "WHERE model = %s ORDER BY step", (model,)).fetchall()[1:]]


def _run_loop(ctx: Context, sql: str, model: str, data: str, steps: int) -> tuple[list[tuple[int, int]], float]:
    """Run the loop in its own session; sample the partition sizes after every step: (sizes, s/step)."""
    sizes: list[tuple[int, int]] = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            with ctx.connect() as c:
                c.execute(sql, (model, steps, data, BATCH))
        except BaseException as e:  # noqa: BLE001 - reported below
            err.append(e)

    t = threading.Thread(target=target)
    t.start()
    seen = 0
    while t.is_alive() or seen < steps:
        step = ctx.conn.execute("SELECT step FROM llm_model WHERE name = %s", (model,)).fetchone()[0]
        if step > seen:
            seen = step
            sizes.append(ctx.conn.execute(SIZES).fetchone())
        elif not t.is_alive():
            break
        time.sleep(0.2)
    t.join()
    if err:
        raise err[0]
    gaps = step_gaps(ctx.conn, model)[1:]
    return sizes, statistics.median(gaps) if gaps else float("nan")


def run(ctx: Context) -> list[Table]:
    steps = 6 if ctx.quick else 15
    cfg = f"{ctx.model}_loop"
    ctx.conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) VALUES "
                     "(%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING", (cfg, *CONFIG.values()))
    table = Table(f"Training loops over {steps} steps, batch {BATCH} x {T} tokens, 27.5M parameters",
                  ["loop", "s/step", "durable MB after 1", f"durable MB after {steps}", "scratch MB after 1",
                   f"scratch MB after {steps}"])
    mb = 1e6
    try:
        for i, (name, sql) in enumerate(LOOPS.items()):
            model, data = f"{cfg}_{i}", f"{cfg}_{i}_ds"
            ctx.conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
            ctx.conn.execute("SELECT llm_model_init(%s, %s)", (model, cfg))
            random_dataset(ctx.conn, data, 8, T, CONFIG["vocab_size"], 0)
            ctx.conn.execute("VACUUM llm_tile_durable")
            ctx.conn.execute("VACUUM llm_tile_scratch")
            ctx.log(f"loop: {name}, {steps} steps")
            sizes, per_step = _run_loop(ctx, sql, model, data, steps)
            table.add(name, round(per_step, 2), round(sizes[0][0] / mb), round(sizes[-1][0] / mb),
                      round(sizes[0][1] / mb), round(sizes[-1][1] / mb))
            ctx.conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
            ctx.conn.execute("DELETE FROM llm_dataset_source WHERE dataset = %s", (data,))
    finally:
        ctx.conn.execute("DELETE FROM llm_model_config AS c WHERE c.name = %s AND NOT EXISTS "
                         "(SELECT 1 FROM llm_model AS m WHERE m.config = c.name)", (cfg,))
    table.notes += [
        "s/step: median time from one step's log row to the next from step 3 on (step, commit, and for CALL "
        "its VACUUM of the tile partitions); sizes: pg_total_relation_size of the partitions, sampled after "
        "each step (the partitions were vacuumed before each loop).",
        "A SELECT holds one snapshot until it returns: every tile version its steps replace stays on disk, and "
        "new versions extend the files instead of reusing vacuumed pages.",
    ]
    return [table]
