"""sampling microkernel: the next token drawn from one float32 logits row (greedy, temperature, top-k, top-p),
in float64, from a generator seeded by (seed, step). The SQL side (parameter checks, llm_sample,
llm_sample_keep, the decoding loop) is py/api/generate.py (sql/api/generate.sql)."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.tiles import floats


def sample_logits(logits: bytes, temperature: float, top_k: int, top_p: float, seed: int, step: int,
                  keep: bool) -> int | list[int]:
    """The token drawn from a logits row (float32 bytes), or (keep) the ids the filters keep, ascending."""
    z = floats(logits).astype(np.float64)
    if temperature == 0:
        best = int(np.argmax(z))
        return [best] if keep else best
    z = z / temperature
    n = z.size
    if 0 < top_k < n:
        z[z < np.partition(z, n - top_k)[n - top_k]] = -np.inf
    if top_p < 1.0:
        order = np.argsort(z, kind='stable')
        s = z[order]
        p = np.exp(s - s[-1])
        cum = np.cumsum(p / p.sum())
        drop = cum <= 1.0 - top_p
        drop[-1] = False
        z[order[drop]] = -np.inf
    kept = np.flatnonzero(z > -np.inf)
    if keep:
        return kept.tolist()
    w = np.exp(z[kept] - z[kept].max())
    cdf = np.cumsum(w)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(step)])))
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side='right'))
    return int(kept[min(i, kept.size - 1)])
