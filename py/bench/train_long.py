"""Bench section `train_long` (optional: `--only train_long`): the `train` section's measurement at the
playbook's batch, 8 x 1024 tokens per step (several minutes a step on 2 cores)."""
from __future__ import annotations

from pg_llm.bench import Context, Table
from pg_llm.bench.train import run_cases

OPTIONAL = True


def run(ctx: Context) -> list[Table]:
    return run_cases(ctx, ((8, 1024),))
