"""elementwise microkernels: mul, add_bias and scale of one tile, float32 (add is common.add_tiles). The SQL
side (shape and tiling checks, joins, the backward ops) is py/ops/elementwise.py."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats


def ew_tile(op: str, a: bytes, b: bytes) -> bytes:
    """One output tile of a (op) b, float32: 'add', 'mul', or 'add_bias' (b is one row of w floats added to every
    row of the a tile)."""
    x = floats(a)
    y = floats(b)
    if op == 'add_bias':
        if y.size == 0 or x.size % y.size:
            error('pg_llm: add_bias: a tile of %d floats is not whole rows of the %d-float bias tile'
                  % (x.size, y.size))
        return (x.reshape(-1, y.size) + y).tobytes()
    if x.size != y.size:
        error('pg_llm: %s: tiles of %d and %d floats (tile shapes differ)' % (op, x.size, y.size))
    if op == 'add':
        return (x + y).tobytes()
    if op == 'mul':
        return (x * y).tobytes()
    error('pg_llm: unknown elementwise op %r' % op)


def scale_tile(x: bytes, alpha: float) -> bytes:
    """alpha * x for one tile, in float32."""
    return (floats(x) * np.float32(alpha)).tobytes()
