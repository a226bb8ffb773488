"""grad_norm microkernel: the float64 sum of squares of one tile. The SQL side (llm_sq_norm,
llm_global_grad_norm, llm_clip_coef) is py/ops/grad_norm.py."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.tiles import floats


def sq_sum_tile(x: bytes) -> float:
    """Sum of squares of one tile's float32 values, accumulated in float64."""
    a = floats(x).astype(np.float64)
    return float(np.dot(a, a))
