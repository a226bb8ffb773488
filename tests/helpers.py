"""Small helpers shared by kernel tests: put numpy arrays in, get tensors out."""
from __future__ import annotations

import numpy as np
import psycopg

from pg_llm.loader.tensors import read_tensor, write_tensor


def put(conn: psycopg.Connection, arr: np.ndarray, tile: tuple[int, int] | None = None, name: str = "t") -> int:
    return write_tensor(conn, np.asarray(arr, np.float32), name, tile=tile)


def get(conn: psycopg.Connection, tid: int) -> np.ndarray:
    return read_tensor(conn, tid)


def call(conn: psycopg.Connection, sql: str, *args: object) -> int:
    return conn.execute(sql, args).fetchone()[0]


class FakePlpy:
    """Stands in for PL/Python's plpy when a microkernel's error path runs without a server."""

    class Error(Exception):
        pass

    @staticmethod
    def error(msg: str, hint: str | None = None) -> None:
        raise FakePlpy.Error(msg if hint is None else f"{msg} (HINT: {hint})")
