"""Access model cost: the same work as the tables' owner (row-level security bypassed) and as an ordinary role
(llm_reader for inference, llm_trainer for a training step on its own model), interleaved in one run.

Policies check writes only (reads are USING (true)): inference writes its scratch tiles, a step writes its
scratch and rewrites every parameter and moment tile of the model (a per-row policy check each)."""
from __future__ import annotations

import uuid

import psycopg

from pg_llm.bench import Context, Table, Timed, random_dataset

OPTIONAL = False
CONFIG = dict(n_layer=2, n_head=4, n_embd=256, n_ctx=128, vocab_size=50257)
T, BATCH = 64, 2


def _as(ctx: Context, role: str | None) -> psycopg.Connection:
    c = ctx.connect()
    c.execute("SET jit = off")
    if role:
        c.execute(f"SET ROLE {role}")
    return c


def run(ctx: Context) -> Table:
    conn, tag = ctx.conn, uuid.uuid4().hex[:6]
    reader, trainer = f"llm_bench_reader_{tag}", f"llm_bench_trainer_{tag}"
    cfg, data = f"{ctx.model}_access", f"{ctx.model}_access_ds"
    conn.execute(f"DELETE FROM llm_model_config WHERE name = '{cfg}' AND NOT EXISTS "
                 f"(SELECT 1 FROM llm_model WHERE config = '{cfg}')")
    conn.execute(f"INSERT INTO llm_model_config (name, {', '.join(CONFIG)}) "
                 f"SELECT %s, {', '.join(['%s'] * len(CONFIG))} WHERE NOT EXISTS "
                 f"(SELECT 1 FROM llm_model_config WHERE name = %s)", (cfg, *CONFIG.values(), cfg))
    random_dataset(conn, data, rows=16, block=T, vocab=CONFIG["vocab_size"], seed=1)
    conn.execute(f"CREATE ROLE {reader} IN ROLE llm_reader")
    conn.execute(f"CREATE ROLE {trainer} IN ROLE llm_trainer")
    # inference reads a model nobody trains meanwhile: a step's new weights would miss one session's weight cache
    infer_m, owner_m, trainer_m = f"{ctx.model}_acc_infer", f"{ctx.model}_acc_owner", f"{ctx.model}_acc_trainer"
    sessions: list[psycopg.Connection] = []
    try:
        for m in (infer_m, owner_m, trainer_m):
            conn.execute("SELECT llm_model_drop(%s, TRUE)", (m,))
        for m in (infer_m, owner_m):
            conn.execute("SELECT llm_model_init(%s, %s, seed => 1)", (m, cfg))
        t = _as(ctx, trainer)
        sessions.append(t)
        t.execute("SELECT llm_model_init(%s, %s, seed => 1)", (trainer_m, cfg))
        own, rd = _as(ctx, None), _as(ctx, reader)
        sessions += [own, rd]
        tokens = list(range(1, T + 1))
        logits = "SELECT llm_logits(%s, %s)"
        step = "SELECT llm_train_step(%s, %s, batch_size => %s, dropout => 0.0)"
        res = ctx.compare({
            "llm_logits (64 tokens), owner": Timed(lambda: own.execute(logits, (infer_m, tokens))),
            "llm_logits (64 tokens), llm_reader": Timed(lambda: rd.execute(logits, (infer_m, tokens))),
            "llm_train_step (2 x 64), owner": Timed(lambda: own.execute(step, (owner_m, data, BATCH))),
            "llm_train_step (2 x 64), llm_trainer": Timed(lambda: t.execute(step, (trainer_m, data, BATCH))),
        })
    finally:
        for s in sessions:
            s.close()
        for m in (infer_m, owner_m, trainer_m):
            conn.execute("SELECT llm_model_drop(%s, TRUE)", (m,))
        conn.execute("DELETE FROM llm_dataset_source WHERE dataset = %s", (data,))
        conn.execute(f"DROP ROLE IF EXISTS {reader}")
        conn.execute(f"DROP ROLE IF EXISTS {trainer}")
    table = Table("Access model: owner vs ordinary roles (same run, interleaved)",
                  ["work", "median s", "vs owner"])
    names = list(res)
    for i, name in enumerate(names):
        base = res[names[i - i % 2]].median
        table.add(name, f"{res[name].median:.3f}", f"{res[name].median / base:.2f}x")
    sizes = ", ".join(f"{k} = {v}" for k, v in CONFIG.items())
    table.notes.append(f"model: {sizes}; the trainer's model is its own (same seed), inference reads a "
                       "third model (the owner's, not trained meanwhile); row-level security costs what the 'vs "
                       "owner' column shows.")
    return table
