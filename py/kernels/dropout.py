"""dropout microkernel: inverted dropout of one tile with a mask regenerated from (seed, tr, tc). The SQL side
(llm_dropout, llm_dropout_backward: rate and seed checks, rate 0 as a copy) is py/ops/dropout.py."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.tiles import floats


def dropout_array(a: np.ndarray, rate: float, seed: int, tr: int, tc: int) -> np.ndarray:
    """a * mask / (1 - rate) for the values of tile (tr, tc) (row-major), float32; the mask comes from
    PCG64(SeedSequence([seed, tr, tc])) (also the fused training block's residual dropout, per tile)."""
    bits = np.random.PCG64(np.random.SeedSequence([seed % 2**64, tr, tc])).random_raw(a.size).reshape(a.shape)
    u = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # [0, 1), 53 bits
    scale = np.float32(1.0 / (1.0 - rate))
    return np.where(u >= rate, a * scale, np.float32(0)).astype(np.float32)


def dropout_rows(a: np.ndarray, rate: float, seed: int, th: int, tw: int) -> np.ndarray:
    """dropout_array over a whole matrix cut in tiles (th, tw): the masks the chain's dropout draws per tile."""
    out = np.empty_like(a)
    for r in range(0, a.shape[0], th):
        for c in range(0, a.shape[1], tw):
            out[r:r + th, c:c + tw] = dropout_array(a[r:r + th, c:c + tw], rate, seed, r // th, c // tw)
    return out


def dropout_tile(x: bytes, rate: float, seed: int, tr: int, tc: int) -> bytes:
    """dropout_array of one tile's payload."""
    return dropout_array(floats(x), rate, seed, tr, tc).astype('<f4').tobytes()
