"""pg-llm train | generate | eval: thin shells over CALL llm_train_run, llm_generate_stream and
llm_perplexity; what they print equals what the SQL returns."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pg_llm.assets import gpt2_dir

from conftest import Server

CLI = str(Path(sys.executable).parent / "pg-llm")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def dsn(server: Server) -> str:
    dsn = server.fresh_db("t_cli_run")
    subprocess.run([CLI, "tokenizer", "import", "--dsn", dsn, "--name", "gpt2", str(gpt2_dir() / "encoder.json"),
                    str(gpt2_dir() / "vocab.bpe")], check=True, capture_output=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) "
                     "VALUES ('cli-tiny', 1, 2, 32, 32, 50257)")
        conn.execute("SELECT llm_model_init('m', 'cli-tiny', seed => 1)")
    text = " ".join(f"Line {i}: to be, or not to be, that is the question." for i in range(40))
    subprocess.run([CLI, "corpus", "load", "--dsn", dsn, "--name", "d", "-", "--block-size", "16", "--val-fraction",
                    "0.2"], input=text, text=True, check=True, capture_output=True)
    return dsn


def test_train_runs_the_loop_and_prints_the_last_step(dsn: str) -> None:
    p = cli("train", "m", "--steps", "2", "--dataset", "d", "--batch-size", "2", "--lr", "1e-3", "--dsn", dsn)
    assert p.returncode == 0, p.stderr
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT step, loss, lr FROM llm_train_log WHERE model = 'm' ORDER BY step").fetchall()
        sched = conn.execute("SELECT schedule->>'batch_size' FROM llm_train_log WHERE model = 'm' AND step = 1"
                             ).fetchone()[0]
    assert [r[0] for r in rows] == [1, 2] and sched == "2"
    assert p.stdout.strip() == f"step 2 | loss {rows[1][1]:.4f}"
    assert "2/2" in p.stderr  # the progress bar's last state
    q = cli("train", "m", "--steps", "3", "--quiet", "--dsn", dsn)  # resumes with the run's own schedule
    assert q.returncode == 0, q.stderr
    assert "step 3/3 | loss" in q.stderr


def test_generate_streams_what_llm_generate_returns(dsn: str) -> None:
    p = cli("generate", "m", "Hello", "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "20", "--seed",
            "3", "--dsn", dsn)
    assert p.returncode == 0, p.stderr
    with psycopg.connect(dsn) as conn:
        new = conn.execute("SELECT llm_generate('m', 'Hello', max_new_tokens => 6, temperature => 0.9, top_k => 20, "
                           "seed => 3)").fetchone()[0]
    assert p.stdout == "Hello" + new + "\n"


def test_eval_prints_llm_perplexity(dsn: str) -> None:
    p = cli("eval", "m", "--text", "To be, or not to be", "--dsn", dsn)
    q = cli("eval", "m", "--dataset", "d", "--dsn", dsn)
    assert p.returncode == 0 and q.returncode == 0, p.stderr + q.stderr
    with psycopg.connect(dsn) as conn:
        t = conn.execute("SELECT perplexity, tokens_scored FROM llm_perplexity('m', 'To be, or not to be')").fetchone()
        d = conn.execute("SELECT perplexity FROM llm_perplexity('m', dataset => 'd', split => 'val')").fetchone()
    assert p.stdout.startswith(f"perplexity {t[0]:.4f} |") and p.stdout.strip().endswith(f"{t[1]} tokens scored")
    assert q.stdout.startswith(f"perplexity {d[0]:.4f} |")


def test_errors_are_one_line() -> None:
    p = cli("eval", "m", "--dsn", "dbname=none")
    assert p.returncode == 1 and p.stderr.strip() == "pg-llm: error: give --text TEXT or --dataset NAME (one of them)"
    q = cli("train", "--help")
    assert q.returncode == 0 and "--warmup-steps" in q.stdout
