"""Training-test helpers: a synthetic dataset (train + val rows), parameter snapshots, a loop run from another
thread and waiting for its steps."""
from __future__ import annotations

import threading
import time

import numpy as np
import psycopg

from pg_llm.loader.tensors import read_tensor


def synthetic_dataset(conn: psycopg.Connection, name: str, rows: int = 8, val_rows: int = 2, block: int = 16,
                      vocab: int = 301, seed: int = 5) -> None:
    """Rows of random token windows, registered like the corpus loader does (one llm_dataset_source row)."""
    rng = np.random.default_rng(seed)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO llm_dataset_source (dataset, source_hash, tokenizer, block_size, stride, "
                    "val_fraction, documents, tokens, train_rows, val_rows, encoder, sources) VALUES "
                    "(%s, 'synthetic', 'gpt2', %s, %s, 0, 1, %s, %s, %s, 'synthetic', '{}')",
                    (name, block, block, (rows + val_rows) * block, rows, val_rows))
        for i in range(rows + val_rows):
            s = rng.integers(0, vocab, block + 1)
            cur.execute("INSERT INTO llm_dataset (dataset, split, tokens, targets, source_hash, pos) "
                        "VALUES (%s, %s, %s, %s, 'synthetic', %s)",
                        (name, "train" if i < rows else "val", s[:-1].tolist(), s[1:].tolist(), i))


def snapshot(conn: psycopg.Connection, model: str, roles: tuple[str, ...] = ("param", "adam_m", "adam_v")
             ) -> dict[tuple[str, str], np.ndarray]:
    rows = conn.execute("SELECT name, role, id FROM llm_tensor WHERE model = %s AND role = ANY(%s)",
                        (model, list(roles))).fetchall()
    return {(n, r): read_tensor(conn, i) for n, r, i in rows}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run_async(dsn: str, sql: str) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                out["pid"] = c.info.backend_pid
                c.add_notice_handler(lambda d: out.setdefault("notices", []).append(d.message_primary))
                out["result"] = c.execute(sql).fetchall() if sql.startswith("SELECT") else c.execute(sql)
        except psycopg.Error as e:
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, out


def wait_for_step(conn: psycopg.Connection, model: str, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while conn.execute("SELECT coalesce(max(step), 0) FROM llm_train_log WHERE model = %s",
                       (model,)).fetchone()[0] < step:
        assert time.time() < deadline, "training did not progress"
        time.sleep(0.05)
