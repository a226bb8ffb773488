"""adamw microkernel: one AdamW step on one tile (param, grad, m, v -> new param, m, v), in float32 and in
place like torch.optim.AdamW. The SQL side (chunked UPDATEs, optimizer state, zero utilities) is
py/ops/adamw.py (sql/kernels/adamw.sql)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats, payload


def adamw_tile(p: bytes, g: bytes, m: bytes, v: bytes, h: Sequence[float]) -> list[bytes]:
    """New (param, m, v) payloads of one tile. h = [lr, beta1, beta2, eps, weight_decay, grad_scale, step]."""
    lr, b1, b2, eps, wd, scale, t = h
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t  # Python floats: beta^t underflows quietly to 0 at late steps
    x = floats(p).copy()
    n = x.size
    if not (len(g) == len(m) == len(v) == 4 * n):
        error('pg_llm: adamw: param, grad, m and v tiles of %d, %d, %d and %d floats (tile shapes differ)'
              % (n, len(g) // 4, len(m) // 4, len(v) // 4))
    c = np.float32  # float32 arithmetic, in place, as torch's: 2.7x faster than float64 per tile
    grad = floats(g) * c(scale)
    m32 = floats(m) * c(b1)
    m32 += c(1.0 - b1) * grad
    grad *= grad
    v32 = floats(v) * c(b2)
    v32 += c(1.0 - b2) * grad
    x *= c(1.0 - lr * wd)
    step = np.sqrt(v32)
    step *= c(1.0 / bc2 ** 0.5)
    step += c(eps)
    np.divide(m32, step, out=step)
    step *= c(lr / bc1)
    x -= step
    return [payload(x), payload(m32), payload(v32)]
