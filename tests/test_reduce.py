"""Row and column sums over ragged tiles and their broadcast backward, against numpy and torch.autograd."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels import runtime
from pg_llm.kernels.reduce import broadcast_tile, sum_tile

from conftest import close
from helpers import FakePlpy, call, f32, get, put, refused

SHAPES = [  # (rows, cols, tile): sizes that are not multiples of the tile
    (5, 7, (4, 4)),
    (37, 50, (16, 16)),
    (300, 3, (256, 256)),
    (1, 13, (1, 5)),
    (9, 1, (4, 1)),
]


def meta(conn: psycopg.Connection, tid: int) -> tuple[list[int], list[int]]:
    return conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (tid,)).fetchone()


# ---- numpy microkernels, no server -------------------------------------------------------------------------

def test_microkernels_in_numpy(rng: np.random.Generator) -> None:
    x = rng.standard_normal((7, 5), dtype=np.float32)
    close(f32(sum_tile(x.tobytes(), 5, 0), 5), x.astype(np.float64).sum(axis=0))
    close(f32(sum_tile(x.tobytes(), 7, 1), 7), x.astype(np.float64).sum(axis=1))
    v = rng.standard_normal(5, dtype=np.float32)
    close(f32(broadcast_tile(v.tobytes(), 3, 5, 0), 3, 5), np.tile(v, (3, 1)))
    close(f32(broadcast_tile(v.tobytes(), 5, 2, 1), 5, 2), np.tile(v[:, None], (1, 2)))


def test_sum_accumulates_in_float64() -> None:
    x = np.full((4096, 1), 0.1, dtype=np.float32)
    got = f32(sum_tile(x.tobytes(), 1, 0), 1)[0]
    assert abs(got - 4096 * np.float64(np.float32(0.1))) < 1e-4


def test_microkernel_errors_in_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "plpy", FakePlpy)
    with pytest.raises(FakePlpy.Error, match="tile of 7 floats is not whole rows of 2"):
        sum_tile(np.ones(7, "<f4").tobytes(), 2, 0)
    with pytest.raises(FakePlpy.Error, match="gradient tile of 4 floats, expected 3"):
        broadcast_tile(np.ones(4, "<f4").tobytes(), 2, 3, 0)


# ---- forward and backward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("r,c,tile", SHAPES)
def test_sum_rows(conn: psycopg.Connection, rng: np.random.Generator, r: int, c: int, tile: tuple[int, int]) -> None:
    x = rng.standard_normal((r, c), dtype=np.float32)
    out = call(conn, "SELECT llm_sum_rows(%s)", put(conn, x, tile))
    close(get(conn, out), x.astype(np.float64).sum(axis=0))
    assert meta(conn, out) == ([c], [1, min(tile[1], c)])


@pytest.mark.parametrize("r,c,tile", SHAPES)
def test_sum_cols(conn: psycopg.Connection, rng: np.random.Generator, r: int, c: int, tile: tuple[int, int]) -> None:
    x = rng.standard_normal((r, c), dtype=np.float32)
    out = call(conn, "SELECT llm_sum_cols(%s)", put(conn, x, tile))
    close(get(conn, out), x.astype(np.float64).sum(axis=1, keepdims=True))
    assert meta(conn, out) == ([r, 1], [min(tile[0], r), 1])


def test_one_dimensional(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    v = rng.standard_normal(11, dtype=np.float32)
    iv = put(conn, v, (1, 4))
    close(get(conn, call(conn, "SELECT llm_sum_rows(%s)", iv)), v)
    close(get(conn, call(conn, "SELECT llm_sum_cols(%s)", iv)), v.astype(np.float64).sum().reshape(1, 1))


def test_accumulate(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    x = rng.standard_normal((37, 50), dtype=np.float32)
    ix = put(conn, x, (16, 16))
    out = put(conn, np.ones(50), (16, 16), name="acc")
    assert call(conn, "SELECT llm_sum_rows(%s, %s, TRUE)", ix, out) == out
    close(get(conn, out), 1 + x.astype(np.float64).sum(axis=0))
    call(conn, "SELECT llm_sum_rows(%s, %s)", ix, out)
    close(get(conn, out), x.astype(np.float64).sum(axis=0))


@pytest.mark.parametrize("r,c,tile", SHAPES)
def test_backward_matches_torch(conn: psycopg.Connection, rng: np.random.Generator, r: int, c: int,
                                tile: tuple[int, int]) -> None:
    x = rng.standard_normal((r, c), dtype=np.float32)
    ds_rows = rng.standard_normal(c, dtype=np.float32)
    ds_cols = rng.standard_normal((r, 1), dtype=np.float32)
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ((tx.sum(dim=0) * torch.tensor(ds_rows, dtype=torch.float64)).sum()
     + (tx.sum(dim=1, keepdim=True) * torch.tensor(ds_cols, dtype=torch.float64)).sum()).backward()
    ix = put(conn, x, tile)
    dx = call(conn, "SELECT llm_sum_rows_backward(%s, p_like => %s)", put(conn, ds_rows, tile), ix)
    assert meta(conn, dx) == ([r, c], [min(tile[0], r), min(tile[1], c)])
    assert call(conn, "SELECT llm_sum_cols_backward(%s, %s, %s)", put(conn, ds_cols, tile), ix, dx) == dx
    close(get(conn, dx), tx.grad.numpy())


def test_backward_like_needs_no_tiles(conn: psycopg.Connection) -> None:
    like = call(conn, "SELECT llm_tensor_create('like', ARRAY[6, 5], ARRAY[4, 4])")
    dx = call(conn, "SELECT llm_sum_rows_backward(%s, %s)", put(conn, np.arange(5), (4, 4)), like)
    close(get(conn, dx), np.tile(np.arange(5.0), (6, 1)))


# ---- errors: clear messages, nothing written -----------------------------------------------------------------

def test_errors(conn: psycopg.Connection) -> None:
    x = put(conn, np.ones((5, 7)), (4, 4), name="x")
    refused(conn, r"pg_llm: sum_rows: input x \(tensor id 999999\) does not exist", "SELECT llm_sum_rows(999999)")
    wrong = put(conn, np.zeros(5), (4, 4), name="o5")
    refused(conn, r'pg_llm: sum_rows: output tensor "o5" has shape \(5,\) tile \{1,4\}, expected shape \(7,\)',
            "SELECT llm_sum_rows(%s, %s)", x, wrong)
    refused(conn, r'pg_llm: sum_cols: output tensor "o5" has shape \(5,\) tile \{1,4\}, expected shape \(5, 1\)',
            "SELECT llm_sum_cols(%s, %s)", x, wrong)
    refused(conn, "pg_llm: sum_rows: output tensor id .* is also an input", "SELECT llm_sum_rows(%s, %s)", x, x)
    refused(conn, r'pg_llm: sum_rows_backward: dy "o5" has shape \(5,\), expected \(7,\) \(the sum_rows of like "x" '
            r"\(5, 7\)\)", "SELECT llm_sum_rows_backward(%s, %s)", wrong, x)
    refused(conn, r'pg_llm: sum_cols_backward: dy "o5" has shape \(5,\), expected \(5, 1\)',
            "SELECT llm_sum_cols_backward(%s, %s)", wrong, x)
    dy3 = put(conn, np.zeros(7), (1, 3), name="dy3")
    refused(conn, r'pg_llm: sum_rows_backward: dy "dy3" is cut in tiles of \{1,3\}, expected \{1,4\} to match like '
            r'"x" \(tiles \{4,4\}\)', "SELECT llm_sum_rows_backward(%s, %s)", dy3, x)
    refused(conn, r"pg_llm: sum_cols_backward: input like \(tensor id 999999\) does not exist",
            "SELECT llm_sum_cols_backward(%s, 999999)", dy3)


def test_missing_tiles(conn: psycopg.Connection) -> None:
    x = put(conn, np.ones((5, 7)), (4, 4), name="x")
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tc = 1", (x,))
    refused(conn, "pg_llm: sum_rows: wrote 1 of the 2 output tiles", "SELECT llm_sum_rows(%s)", x)
