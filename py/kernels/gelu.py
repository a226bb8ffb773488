"""gelu microkernels: GPT-2's tanh approximation of one tile, forward and backward, float32 like torch's
gelu(approximate='tanh'). The SQL side (tiling, joins, the backward formula) is py/ops/gelu.py."""
from __future__ import annotations

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats

K = np.float32(0.7978845608028654)  # sqrt(2 / pi)
C = np.float32(0.044715)


def gelu(a: np.ndarray) -> np.ndarray:
    """GELU (tanh form) of a float32 array (also the fused linear and block kernels' activation)."""
    a = np.asarray(a, dtype=np.float32)
    t = C * a  # 0.5 * a * (1 + tanh(K * (a + C * a * a * a))), the same float32 operations in place
    t *= a
    t *= a
    t += a
    t *= K
    np.tanh(t, out=t)
    t += np.float32(1)
    out = np.float32(0.5) * a
    out *= t
    return out


def gelu_tile(x: bytes) -> bytes:
    """GELU of one tile."""
    return gelu(floats(x)).astype('<f4').tobytes()


def gelu_backward_tile(x: bytes, dy: bytes) -> bytes:
    """dy * gelu'(x) for one tile (x and dy of one shape), float32."""
    a, g = floats(x), floats(dy)
    if a.size != g.size:
        error('pg_llm: gelu_backward: x and dy tiles of %d and %d floats' % (a.size, g.size))
    return gelu_backward(a, g).astype('<f4').tobytes()


def gelu_backward(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """g * gelu'(a), float32 arrays of one shape (also the fused training block's): three temporaries, in place
    (the expression form made ten: 0.13 s instead of 0.06 s at 2,048 x 3,072)."""
    half, one = np.float32(0.5), np.float32(1)
    a2 = a * a
    t = C * a2
    t *= a
    t += a
    t *= K
    np.tanh(t, out=t)  # t = tanh(K (a + C a^3))
    a2 *= np.float32(3) * C
    a2 += one
    a2 *= K  # K (1 + 3 C a^2)
    d = t * t
    np.subtract(one, d, out=d)
    d *= a
    d *= half
    d *= a2  # 0.5 a (1 - t^2) K (1 + 3 C a^2)
    t += one
    t *= half
    d += t  # + 0.5 (1 + t)
    d *= g
    return d
