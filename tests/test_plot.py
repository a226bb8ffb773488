"""pg-llm plot: loss / validation loss / learning rate from llm_train_log to an image; clear errors when there
is nothing to plot."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pg_llm.commands.plot import plot_training

PG_CLI = [sys.executable, "-c", "import sys; from pg_llm.cli import main; sys.exit(main())"]
LOG = """CREATE TABLE IF NOT EXISTS llm_train_log (model TEXT, step INT, loss FLOAT8, lr FLOAT8, grad_norm FLOAT8,
         tokens BIGINT, seconds FLOAT8, val_loss FLOAT8)"""  # the columns pg-llm plot relies on


def add_log(conn: psycopg.Connection, model: str, rows: list[dict[str, object]]) -> None:
    """Insert log rows; any other NOT NULL column of the real table gets a placeholder."""
    conn.execute(LOG)
    conn.execute("SELECT llm_model_create(%s, 'gpt2-small') WHERE NOT EXISTS (SELECT 1 FROM llm_model "
                 "WHERE name = %s)", (model, model))
    extra = conn.execute("""SELECT column_name, data_type FROM information_schema.columns
        WHERE table_name = 'llm_train_log' AND is_nullable = 'NO' AND column_default IS NULL""").fetchall()
    dummy = {"text": "synthetic", "integer": 8, "bigint": 8, "double precision": 0.0, "jsonb": "{}"}
    for r in rows:
        vals = {c: dummy.get(t, 0) for c, t in extra} | {"grad_norm": 1.0, "tokens": 1024, "seconds": 0.5} | r
        conn.execute(f"INSERT INTO llm_train_log ({', '.join(vals)}) VALUES ({', '.join(['%s'] * len(vals))})",
                     list(vals.values()))


def synthetic(n: int = 300) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(1, n + 1):
        lr = 6e-4 * min(1.0, s / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / n)))
        out.append({"model": "plotm", "step": s, "loss": 3 + 8 * math.exp(-s / 60) + 0.15 * rng.standard_normal(),
                    "lr": lr, "val_loss": 3.1 + 8 * math.exp(-s / 60) if s % 50 == 0 else None})
    return out


def test_plot_writes_png(conn: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    add_log(conn, "plotm", synthetic())
    r = plot_training(conn, "plotm", tmp_path / "loss.png")
    assert (r.points, r.first_step, r.last_step) == (300, 1, 300)
    assert r.best_val_loss is not None and r.best_val_loss < 3.2
    data = r.out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image

    img = matplotlib.image.imread(r.out)
    assert img.shape[0] >= 600 and img.shape[1] >= 1000  # 9 x 6 in at 120 dpi
    cli = subprocess.run([*PG_CLI, "plot", "--model", "plotm", "--out", str(tmp_path / "cli" / "l.svg"), "--log-y",
                          "--dsn", dsn], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "300 log rows, steps 1-300" in cli.stdout and (tmp_path / "cli" / "l.svg").read_text().startswith("<?xml")
    h = subprocess.run([*PG_CLI, "plot", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--model" in h.stdout and "--out" in h.stdout


def test_few_points_and_no_lr(conn: psycopg.Connection, tmp_path: Path) -> None:
    add_log(conn, "short", [{"model": "short", "step": s, "loss": 5.0 - s, "lr": 1e-4, "val_loss": None}
                            for s in (1, 2, 3)])
    r = plot_training(conn, "short", tmp_path / "s.png")
    assert r.points == 3 and r.last_loss == 2.0 and r.best_val_loss is None


def test_empty_log_is_a_clear_error(conn: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    conn.execute(LOG)
    with pytest.raises(ValueError, match="no training log for model 'nobody'"):
        plot_training(conn, "nobody", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    cli = subprocess.run([*PG_CLI, "plot", "--model", "nobody", "--out", str(tmp_path / "x.png"), "--dsn", dsn],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "pg-llm: error: no training log for model 'nobody'" in cli.stderr
    with conn.transaction(force_rollback=True):
        conn.execute("ALTER TABLE llm_train_log RENAME TO llm_train_log_away")
        with pytest.raises(ValueError, match="no llm_train_log table"):
            plot_training(conn, "plotm", tmp_path / "x.png")
