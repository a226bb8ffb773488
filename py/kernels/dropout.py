"""dropout microkernel: inverted dropout of one tile with a mask regenerated from (seed, tr, tc). The SQL side
(llm_dropout, llm_dropout_backward: rate and seed checks, rate 0 as a copy) is py/ops/dropout.py."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.tiles import floats


def dropout_tile(x: bytes, rate: float, seed: int, tr: int, tc: int) -> bytes:
    """x * mask / (1 - rate) for tile (tr, tc), float32; the mask comes from PCG64(SeedSequence([seed, tr, tc]))."""
    a = floats(x)
    bits = np.random.PCG64(np.random.SeedSequence([seed % 2**64, tr, tc])).random_raw(a.size)
    u = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # [0, 1), 53 bits
    scale = np.float32(1.0 / (1.0 - rate))
    return np.where(u >= rate, a * scale, np.float32(0)).astype('<f4').tobytes()
