"""llm_lr_at against a Python reference of warmup + cosine decay, and against torch's LambdaLR driving an optimizer
with the same lambda (the lr each optimizer step actually uses)."""
from __future__ import annotations

import math

import psycopg
import pytest
import torch


def lr_ref(step: int, peak: float = 2.5e-4, warmup: int = 2000, max_steps: int = 500000,
           min_lr: float | None = None) -> float:
    """Step 1 is the first optimizer step: linear warmup to peak at `warmup`, cosine to min_lr at max_steps."""
    lo = 0.1 * peak if min_lr is None else min_lr
    if step <= 0:
        return 0.0
    if step <= warmup:
        return peak * step / warmup
    if step >= max_steps:
        return lo
    w = max(warmup, 0)
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * (step - w) / (max_steps - w)))


CONFIGS = [  # (peak, warmup, max_steps, min_lr)
    (1e-3, 10, 100, None),
    (6e-4, 10, 100, 0.0),
    (1e-3, 0, 50, 1e-5),  # no warmup
    (1e-3, 20, 15, None),  # max_steps <= warmup: straight to min_lr after the warmup
    (3e-4, 1, 2, 3e-5),
]


def sql_lrs(conn: psycopg.Connection, lo: int, hi: int, cfg: tuple) -> list[float]:
    return conn.execute("SELECT array_agg(llm_lr_at(s, %s, %s, %s, %s) ORDER BY s) "
                        "FROM generate_series(%s::INT, %s::INT) AS s", (*cfg, lo, hi)).fetchone()[0]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_reference(conn: psycopg.Connection, cfg: tuple) -> None:
    _, _, max_steps, _ = cfg
    got = sql_lrs(conn, -2, max_steps + 10, cfg)
    want = [lr_ref(s, *cfg) for s in range(-2, max_steps + 11)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_gpt2_defaults(conn: psycopg.Connection) -> None:
    steps = [0, 1, 2, 1000, 1999, 2000, 2001, 100000, 251000, 499999, 500000, 600000]
    got = conn.execute("SELECT array_agg(llm_lr_at(s) ORDER BY o) FROM unnest(%s::INT[]) WITH ORDINALITY AS u(s, o)",
                       (steps,)).fetchone()[0]
    assert got == pytest.approx([lr_ref(s) for s in steps], rel=1e-12, abs=1e-18)
    assert got[1] == pytest.approx(2.5e-4 / 2000)  # step 1 already trains with a small lr
    assert got[5] == pytest.approx(2.5e-4)  # peak at the end of the warmup
    assert got[8] == pytest.approx(0.1 * 2.5e-4 + 0.5 * 0.9 * 2.5e-4)  # the cosine's midpoint
    assert got[-2:] == pytest.approx([2.5e-5, 2.5e-5])  # min_lr = 0.1 * peak, constant after max_steps
    assert conn.execute("SELECT llm_lr_at(NULL)").fetchone()[0] is None


def test_shape(conn: psycopg.Connection) -> None:
    lrs = sql_lrs(conn, 1, 120, (1e-3, 10, 100, None))
    warm, decay = lrs[:10], lrs[9:100]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False)), "warmup increases"
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)), "cosine decreases"
    assert max(lrs) == pytest.approx(1e-3) and min(lrs) == pytest.approx(1e-4)
    assert lrs[99:] == pytest.approx([1e-4] * 21)


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_matches_torch_lambda_lr(conn: psycopg.Connection, cfg: tuple) -> None:
    """LambdaLR counts epochs from 0 before the first step, so optimizer step s uses lambda(s - 1)."""
    peak, _, max_steps, _ = cfg
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_ref(e + 1, *cfg) / peak)
    used = []
    for _ in range(max_steps + 10):
        used.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert sql_lrs(conn, 1, max_steps + 10, cfg) == pytest.approx(used, rel=1e-12, abs=1e-18)


def test_pure_immutable_sql(conn: psycopg.Connection) -> None:
    lang, vol = conn.execute("SELECT l.lanname, p.provolatile FROM pg_proc AS p JOIN pg_language AS l "
                             "ON l.oid = p.prolang WHERE p.proname = 'llm_lr_at'").fetchone()
    assert (lang, vol) == ("sql", "i")
    plan = conn.execute("EXPLAIN (VERBOSE) SELECT llm_lr_at(s) FROM generate_series(1, 3) AS s").fetchall()
    assert "llm_lr_at" not in " ".join(r[0] for r in plan), "the planner inlines it"
