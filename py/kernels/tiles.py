"""Tile payloads and numpy: the one place a tile is decoded, a block of tiles assembled, an array encoded.

A payload is raw little-endian float32 in row-major order (py/gen/storage.py); edge tiles are ragged."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from pg_llm.kernels.runtime import error

F32 = '<f4'


def floats(data: bytes) -> np.ndarray:
    """A payload as a flat read-only float32 array (no copy)."""
    return np.frombuffer(data, dtype=F32)


def matrix(data: bytes, cols: int) -> np.ndarray:
    """A payload as a (rows, cols) read-only float32 array."""
    a = floats(data)
    if cols <= 0 or a.size % cols:
        error('pg_llm: a payload of %d floats is not a whole number of rows of %d' % (a.size, cols))
    return a.reshape(-1, cols)


def payload(a: np.ndarray) -> bytes:
    """An array (any shape, row-major) as a payload."""
    return np.ascontiguousarray(a, dtype=F32).tobytes()


def cut(a: np.ndarray, th: int, tw: int) -> Iterator[tuple[int, int, bytes]]:
    """(tr, tc, payload) of a matrix cut in tiles (th, tw), ragged at the edges, in (tr, tc) order."""
    for r in range(0, a.shape[0], th):
        for c in range(0, a.shape[1], tw):
            yield r // th, c // tw, payload(a[r:r + th, c:c + tw])


def hstack(tiles: Sequence[bytes], rows: int) -> np.ndarray:
    """One tile-row block: tiles of `rows` rows side by side, in column order."""
    return np.hstack([floats(t).reshape(rows, -1) for t in tiles])


def block(tiles: Sequence[bytes], g: Sequence[int], op: str = 'matmul') -> np.ndarray:
    """The float32 block of tiles [r0, r1) x [c0, c1) of a tensor, geom g = [rows, cols, tile_rows, tile_cols,
    r0, r1, c0, c1], from its payloads in (tr, tc) order (a read-only view of one buffer when one tile wide)."""
    rows, cols, th, tw, r0, r1, c0, c1 = g
    if len(tiles) != (r1 - r0) * (c1 - c0):
        error('pg_llm: %s: %d tiles for a block of %d x %d tiles (missing tiles?)'
              % (op, len(tiles), r1 - r0, c1 - c0))
    h, w = min(r1 * th, rows) - r0 * th, min(c1 * tw, cols) - c0 * tw
    if c1 - c0 == 1:
        return np.frombuffer(b''.join(tiles), dtype=F32).reshape(h, w)
    out = np.empty((h, w), dtype=np.float32)
    it = iter(tiles)
    for r in range(0, h, th):
        for c in range(0, w, tw):
            dst = out[r:r + th, c:c + tw]
            dst[...] = floats(next(it)).reshape(dst.shape)
    return out


def whole(tiles: Sequence[bytes], rows: int, cols: int, th: int, tw: int, op: str) -> np.ndarray:
    """A whole (rows, cols) tensor from all its tiles (th x tw, ragged at the edges) in (tr, tc) order."""
    return block(tiles, [rows, cols, th, tw, 0, -(-rows // th), 0, -(-cols // tw)], op)


# ---- the SQL codecs (gen/runtime.py): llm_tile_to_float4, llm_tile_to_float4_2d, llm_float4_to_tile, ... ----

def tile_to_list(data: bytes) -> list[float]:
    return floats(data).tolist()


def tile_to_rows(data: bytes, cols: int) -> list[list[float]]:
    return matrix(data, cols).tolist()


def list_to_tile(values: Sequence) -> bytes:
    return payload(np.asarray(values, dtype=np.float32))


def tile_stats(data: bytes) -> list[float]:
    """[n, min, max, sum, sum of squares, NaN count] in float64."""
    a = floats(data).astype(np.float64)
    return [float(a.size), float(a.min()), float(a.max()), float(a.sum()), float((a * a).sum()),
            float(np.isnan(a).sum())]


def block_rows_skip(tiles: Sequence[bytes], rows: int, first: int, count: int, skip: int) -> list[tuple]:
    """Rows skip .. skip+count-1 of one tile-row block as (first + i, row as a list)."""
    b = hstack(tiles, rows)
    return [(first + i, b[skip + i].tolist()) for i in range(count)]
