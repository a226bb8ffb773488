"""dropout microkernel: inverted dropout of one tile with a mask regenerated from (seed, tr, tc). The SQL side
(llm_dropout, llm_dropout_backward: rate and seed checks, rate 0 as a copy) is py/ops/dropout.py."""
from __future__ import annotations

import math

import numpy as np

from pg_llm.kernels.tiles import floats


def _drop(seed: int, tr: int, tc: int, n: int, rate: float) -> np.ndarray:
    """The first n drop decisions (row-major) of tile (tr, tc)'s mask: PCG64(SeedSequence([seed, tr, tc])), 53-bit
    uniforms u = (bits >> 11) / 2^53, dropped when u < rate. A prefix: an edge tile's mask is the first rows of a
    full tile's. Compared as integers, the same decisions: u < rate <=> bits >> 11 < ceil(rate 2^53) <=> bits <
    ceil(rate 2^53) << 11 (rate 2^53 is exact), with no float64 array formed."""
    bits = np.random.PCG64(np.random.SeedSequence([seed % 2**64, tr, tc])).random_raw(n)
    return bits < np.uint64(math.ceil(rate * 2.0 ** 53) << 11)


def _apply(a: np.ndarray, drop: np.ndarray, rate: float) -> np.ndarray:
    """a / (1 - rate) with the dropped entries 0, float32 (one new array: np.where and a cast made three)."""
    out = a * np.float32(1.0 / (1.0 - rate))
    np.copyto(out, np.float32(0), where=drop)
    return out


def dropout_array(a: np.ndarray, rate: float, seed: int, tr: int, tc: int) -> np.ndarray:
    """a * mask / (1 - rate) for the values of tile (tr, tc) (row-major), float32; the mask comes from
    PCG64(SeedSequence([seed, tr, tc])) (also the fused training block's residual dropout, per tile)."""
    return _apply(a, _drop(seed, tr, tc, a.size, rate).reshape(a.shape), rate)


def dropout_rows(a: np.ndarray, rate: float, seed: int, th: int, tw: int, row0: int = 0) -> np.ndarray:
    """dropout_array over a whole matrix cut in tiles (th, tw): the masks the chain's dropout draws per tile.
    row0: a's rows are rows row0.. of a larger matrix (a rank's share of a data-parallel batch): each row gets the
    mask the whole matrix's tiling gives it. Since an edge tile's mask is a prefix of a full tile's, a row's mask
    depends only on (row0 + its index, th, tw), not on the matrix's height: th = 256 gives every matrix of at
    most 256 rows the masks of its single tile."""
    out = np.empty_like(a)
    i = 0
    while i < a.shape[0]:
        tr, o = divmod(row0 + i, th)
        h = min(th - o, a.shape[0] - i)
        for c in range(0, a.shape[1], tw):
            w = min(tw, a.shape[1] - c)
            drop = _drop(seed, tr, c // tw, (o + h) * w, rate)[o * w:].reshape(h, w)
            out[i:i + h, c:c + w] = _apply(a[i:i + h, c:c + w], drop, rate)
        i += h
    return out


def dropout_tile(x: bytes, rate: float, seed: int, tr: int, tc: int) -> bytes:
    """dropout_array of one tile's payload."""
    return dropout_array(floats(x), rate, seed, tr, tc).astype('<f4').tobytes()
