"""schedule: the learning rate of optimizer step s, linear warmup then cosine decay (pure SQL, IMMUTABLE).

Steps are numbered like llm_adamw_step's p_step: step 1 is the first optimizer step.

    s <= 0                      0                                                  (nothing trained yet)
    1 <= s <= warmup            peak * s / warmup                                  (reaches peak at s = warmup)
    warmup < s < max_steps      min + (peak - min) * (1 + cos(pi * (s - warmup) / (max_steps - warmup))) / 2
    s >= max_steps              min                                                (constant afterwards)

min_lr NULL means 0.1 * peak; warmup <= 0 means no warmup (cosine from s = 1); max_steps <= warmup goes from the
warmup straight to min_lr. With torch, this is LambdaLR(opt, lambda e: llm_lr_at(e + 1) / peak) stepped after each
optimizer step (LambdaLR counts from 0, before the first step).
"""
from __future__ import annotations

from pg_llm.config import TrainConfig
from pg_llm.gen.emit import comment, function

SQL_FILE = "kernels/schedule.sql"
ORDER = 42


def _lr_at() -> str:
    return function(
        "llm_lr_at",
        f"p_step INT, p_peak FLOAT8 DEFAULT {TrainConfig.lr!r}, p_warmup INT DEFAULT {TrainConfig.warmup_steps}, "
        "p_max_steps INT DEFAULT 500000, "
        "p_min_lr FLOAT8 DEFAULT NULL", "FLOAT8", """
        SELECT CASE
          WHEN p_step <= 0 THEN 0::FLOAT8
          WHEN p_step <= p_warmup THEN p_peak * p_step / p_warmup
          WHEN p_step >= p_max_steps THEN coalesce(p_min_lr, 0.1 * p_peak)
          ELSE coalesce(p_min_lr, 0.1 * p_peak) + 0.5 * (p_peak - coalesce(p_min_lr, 0.1 * p_peak))
               * (1 + cos(pi() * (p_step - greatest(p_warmup, 0)) / (p_max_steps - greatest(p_warmup, 0))))
        END""", language="sql", volatility="IMMUTABLE", parallel="SAFE", inline=True, note="""
        Learning rate at optimizer step p_step (1 = first step): linear warmup 0 -> p_peak over p_warmup steps
        (p_peak * step / warmup), cosine decay to p_min_lr (NULL: 0.1 * p_peak) at p_max_steps, p_min_lr after.
        0 for step <= 0; NULL when p_step is NULL.""")


def emit() -> str:
    return "\n".join([comment(__doc__ or "") + "\n", _lr_at()])
