"""Readers during training see whole steps: while CALL llm_train_run commits step after step, every logits
vector and every parameter snapshot other sessions read equals the model's state after some step k, never a
mix of two steps (a torn read)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import psycopg

from gpt2_fixtures import import_tiny
from train_fixtures import run_async, synthetic_dataset

ARGS = "dataset => 'ds', batch_size => 2, lr => 3e-3, warmup_steps => 1, max_steps => 8, dropout => 0.1, seed => 4"
STEPS, TOKENS = 8, [5, 17, 42, 250, 3, 9]
PARAMS = """SELECT m.step, md5(string_agg(t.data, ''::BYTEA ORDER BY v.name, t.tr, t.tc))
            FROM llm_model AS m JOIN llm_tensor AS v ON v.model = m.name AND v.role = 'param' AND v.id > 0
            JOIN llm_tile AS t ON t.tensor_id = v.id WHERE m.name = %s GROUP BY m.step"""


def states(conn: psycopg.Connection, model: str) -> tuple[dict[int, bytes], dict[int, str]]:
    """The logits and the parameter hash after each step 0..STEPS, replayed one llm_train_step at a time."""
    logits, params = {}, {}
    for step in range(STEPS + 1):
        if step:
            conn.execute(f"SELECT llm_train_step(%s, {ARGS})", (model,))
        logits[step] = np.array(conn.execute("SELECT llm_logits(%s, %s)", (model, TOKENS)).fetchone()[0],
                                np.float32).tobytes()
        s, h = conn.execute(PARAMS, (model,)).fetchone()
        params[s] = h
    return logits, params


def test_readers_see_whole_steps(conn: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    synthetic_dataset(conn, "ds")
    for name in ("live", "replay"):
        import_tiny(conn, tmp_path, name)
    seen_logits: list[bytes] = []
    seen_params: list[tuple[int, str]] = []
    stop = threading.Event()

    def read(kind: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set():
                if kind == "logits":
                    row = c.execute("SELECT llm_logits('live', %s)", (TOKENS,)).fetchone()[0]
                    seen_logits.append(np.array(row, np.float32).tobytes())
                else:
                    seen_params.append(c.execute(PARAMS, ("live",)).fetchone())

    readers = [threading.Thread(target=read, args=(k,)) for k in ("logits", "logits", "params")]
    for r in readers:
        r.start()
    trainer, out = run_async(dsn, f"CALL llm_train_run('live', {STEPS}, {ARGS})")
    trainer.join(600)
    stop.set()
    for r in readers:
        r.join(60)
    assert "error" not in out, out.get("error")
    logits, params = states(conn, "replay")
    assert conn.execute(PARAMS, ("live",)).fetchone() == (STEPS, params[STEPS])  # the replay is the same run
    steps_seen = {next((k for k, v in logits.items() if v == got), None) for got in seen_logits}
    assert None not in steps_seen, "a reader saw logits of no step (a torn read)"
    assert all(params.get(s) == h for s, h in seen_params), "a parameter snapshot mixed two steps"
    assert len(steps_seen | {s for s, _ in seen_params}) >= 3, "the readers did not overlap training"
