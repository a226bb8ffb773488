"""numpy arrays <-> tiled tensors, streamed with binary COPY (psycopg 3)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psycopg

DEFAULT_TILE = (256, 256)


def as_matrix(arr: np.ndarray) -> np.ndarray:
    """The stored 2-D view: a 1-D tensor of n is one row of n."""
    a = np.asarray(arr)
    if a.ndim == 1:
        return a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"pg_llm stores 1-D or 2-D tensors, got shape {a.shape}")
    return a


def default_tile(shape: tuple[int, ...], tile: tuple[int, int] | None = None) -> tuple[int, int]:
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    th, tw = tile or DEFAULT_TILE
    return (min(th, rows), min(tw, cols))


def iter_tiles(arr: np.ndarray, tile: tuple[int, int]) -> Iterator[tuple[int, int, bytes]]:
    """(tile_row, tile_col, little-endian float32 bytes) for every tile, ragged at the edges."""
    m = as_matrix(arr)
    th, tw = tile
    for tr in range(0, -(-m.shape[0] // th)):
        for tc in range(0, -(-m.shape[1] // tw)):
            block = m[tr * th:(tr + 1) * th, tc * tw:(tc + 1) * tw]
            yield tr, tc, np.ascontiguousarray(block, dtype="<f4").tobytes()


def check_finite(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"tensor {name!r} has {bad} NaN/Inf values; nothing was written")


@contextmanager
def copy_into(cur: psycopg.Cursor, table: str, columns: str, types: list[str]) -> Iterator[psycopg.Copy]:
    """Binary COPY FROM STDIN into `table` (columns). Where row-level security applies to the role (a trainer
    writing rows of its own: COPY FROM refuses that), the rows go to a temporary table first, then into
    `table` with one INSERT ... SELECT, whose every row the policies check."""
    if not cur.execute("SELECT row_security_active(%s)", (table,)).fetchone()[0]:
        with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(types)
            yield cp
        return
    tmp = f"pg_temp.pg_llm_copy_{table}"
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS pg_llm_copy_{table} AS SELECT {columns} FROM {table} WITH NO DATA")
    try:
        with cur.copy(f"COPY {tmp} ({columns}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(types)
            yield cp
        cur.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {tmp}")
    finally:
        cur.execute(f"DROP TABLE IF EXISTS {tmp}")


def write_tiles(conn: psycopg.Connection, tensor_id: int, arr: np.ndarray, tile: tuple[int, int]) -> int:
    """COPY every tile of arr into llm_tile for an existing tensor id. Returns bytes written."""
    n = 0
    with conn.cursor() as cur:
        with copy_into(cur, "llm_tile", "tensor_id, tr, tc, data", ["int8", "int4", "int4", "bytea"]) as cp:
            for tr, tc, data in iter_tiles(arr, tile):
                cp.write_row((tensor_id, tr, tc, data))
                n += len(data)
    return n


def write_tensor(conn: psycopg.Connection, arr: np.ndarray, name: str, *, model: str = "",
                 role: str = "activation", tile: tuple[int, int] | None = None, replace: bool = False,
                 check_nan: bool = True) -> int:
    """Create a tensor with arr's shape and write its tiles; returns the tensor id.
    With replace=True an existing durable tensor of the same (model, name, role) is dropped first."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim not in (1, 2):
        raise ValueError(f"tensor {name!r}: pg_llm stores 1-D or 2-D tensors, got shape {a.shape}")
    if check_nan:
        check_finite(name, a)
    t = default_tile(a.shape, tile)
    if replace and role not in ("activation", "cache", "grad"):
        conn.execute("DELETE FROM llm_tensor WHERE model = %s AND name = %s AND role = %s AND id > 0",
                     (model, name, role))
    tid = conn.execute("SELECT llm_tensor_create(%s, %s, %s, %s, %s)",
                       (name, list(a.shape), list(t), role, model)).fetchone()[0]
    write_tiles(conn, tid, a, t)
    return tid


def read_tensor(conn: psycopg.Connection, tensor_id: int) -> np.ndarray:
    """Read a whole tensor back as float32 with its catalog shape; checks every tile is present."""
    row = conn.execute("SELECT name, shape, tile FROM llm_tensor WHERE id = %s", (tensor_id,)).fetchone()
    if row is None:
        raise LookupError(f"tensor id {tensor_id} does not exist")
    name, shape, (th, tw) = row
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    out = np.empty((rows, cols), dtype=np.float32)
    seen = 0
    with conn.cursor() as cur:
        with cur.copy("COPY (SELECT tr, tc, data FROM llm_tile WHERE tensor_id = %s) TO STDOUT (FORMAT BINARY)"
                      % int(tensor_id)) as cp:
            cp.set_types(["int4", "int4", "bytea"])
            for tr, tc, data in cp.rows():
                r0, c0 = tr * th, tc * tw
                h, w = min(th, rows - r0), min(tw, cols - c0)
                if len(data) != 4 * h * w:
                    raise ValueError(f"tensor {name!r} tile ({tr}, {tc}) has {len(data)} bytes, "
                                     f"expected {4 * h * w} for a {h}x{w} tile")
                out[r0:r0 + h, c0:c0 + w] = np.frombuffer(data, dtype="<f4").reshape(h, w)
                seen += 1
    want = -(-rows // th) * -(-cols // tw)
    if seen != want:
        raise ValueError(f"tensor {name!r} has {seen} tiles, expected {want}")
    return out.reshape(shape)


def tensor_id(conn: psycopg.Connection, model: str, name: str, role: str = "param") -> int:
    return conn.execute("SELECT llm_tensor(%s, %s, %s)", (model, name, role)).fetchone()[0]
