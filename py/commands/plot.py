"""pg-llm plot: training curves of a model from llm_train_log (loss and validation loss vs step above, the
learning rate below), written as an image (PNG, SVG or PDF by the extension).

  pg-llm plot --model gpt2 --out loss.png

Needs matplotlib (pip install matplotlib; it is in pg_llm's test extra), imported only by this command.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pg_llm.commands.db import dsn_argument, resolve_dsn


@dataclass(frozen=True)
class PlotResult:
    out: Path
    points: int
    first_step: int
    last_step: int
    last_loss: float | None
    best_val_loss: float | None


def _num(v: object) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def read_log(conn: psycopg.Connection, model: str) -> list[tuple[int, float | None, float | None, float | None]]:
    """(step, loss, val_loss, lr) of a model, by step; a clear error when there is nothing to plot."""
    exists = conn.execute("SELECT to_regclass('llm_train_log') IS NOT NULL").fetchone()[0]
    if not exists:
        raise ValueError("this database has no llm_train_log table (it comes with pg_llm's training API: "
                         "reinstall pg_llm: `pg-llm db start --recreate`, or psql -f install.sql)")
    rows = conn.execute("SELECT step, loss, val_loss, lr FROM llm_train_log WHERE model = %s ORDER BY step",
                        (model,)).fetchall()
    out = [(int(s), _num(loss), _num(val), _num(lr)) for s, loss, val, lr in rows]
    if not any(loss is not None or val is not None for _, loss, val, _ in out):
        logged = conn.execute("SELECT coalesce(string_agg(DISTINCT model, ', '), '(none)') FROM llm_train_log"
                              ).fetchone()[0]
        raise ValueError(f"no training log for model {model!r}: llm_train_log has no loss for it (train it with "
                         f"llm_train first); models with a log: {logged}")
    return out


def _ema(values: list[float], span: int) -> list[float]:
    alpha, out, acc = 2.0 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_training(conn: psycopg.Connection, model: str, out: str | Path, *, log_y: bool = False) -> PlotResult:
    """Loss (raw, and smoothed when there are many steps) and validation loss vs step, lr below."""
    rows = read_log(conn, model)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("pg-llm plot needs matplotlib: pip install matplotlib (or pip install 'pg_llm[test]')") \
            from e
    train = [(s, v) for s, v, _, _ in rows if v is not None]
    val = [(s, v) for s, _, v, _ in rows if v is not None]
    lr = [(s, v) for s, _, _, v in rows if v is not None]
    fig, (ax, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(9, 6), height_ratios=(3, 1), layout="constrained")
    if train:
        steps, losses = zip(*train, strict=True)
        smooth = len(train) > 50
        ax.plot(steps, losses, color="tab:blue", lw=1, alpha=0.35 if smooth else 1.0,
                marker=None if len(train) > 30 else "o", ms=3, label="train loss")
        if smooth:
            span = max(5, len(train) // 50)
            ax.plot(steps, _ema(list(losses), span), color="tab:blue", lw=2, label=f"train loss (EMA, span {span})")
    if val:
        ax.plot(*zip(*val, strict=True), color="tab:orange", lw=2, marker="o", ms=4, label="validation loss")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    last = train[-1] if train else None
    best = min(val, key=lambda p: p[1]) if val else None
    title = f"{model}: steps {rows[0][0]}-{rows[-1][0]}"
    if last:
        title += f", last loss {last[1]:.3f}"
    if best:
        title += f", best val loss {best[1]:.3f} @ {best[0]}"
    ax.set_title(title)
    if lr:
        ax_lr.plot(*zip(*lr, strict=True), color="tab:green", lw=1.5)
    else:
        ax_lr.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=ax_lr.transAxes)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(True, alpha=0.3)
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return PlotResult(path, len(rows), rows[0][0], rows[-1][0], last[1] if last else None, best[1] if best else None)


def _plot(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        r = plot_training(conn, args.model, args.out, log_y=args.log_y)
    extra = f", last loss {r.last_loss:.4f}" if r.last_loss is not None else ""
    extra += f", best val loss {r.best_val_loss:.4f}" if r.best_val_loss is not None else ""
    print(f"wrote {r.out}: {r.points} log rows, steps {r.first_step}-{r.last_step}{extra}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot loss, validation loss and learning rate vs step from llm_train_log",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name (llm_train_log.model)")
    p.add_argument("--out", required=True, help="output image: .png, .svg or .pdf (client side)")
    p.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    dsn_argument(p)
    p.set_defaults(func=_plot)
