"""init microkernel: one tile of seeded N(mean, std) float32, for GPT-2's initialization. The SQL side
(which tensors get which mean and std, the per-tile seeds) is py/api/init.py (sql/api/init.sql)."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.tiles import payload


def normal_tile(rows: int, cols: int, mean: float, std: float, seed: int) -> bytes:
    """A rows x cols tile of N(mean, std) float32 from its own generator (std 0 gives the constant mean)."""
    if std == 0:
        return payload(np.full((rows, cols), mean, dtype=np.float32))
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    return payload(g.standard_normal((rows, cols)) * std + mean)
