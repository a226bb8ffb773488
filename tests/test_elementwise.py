"""elementwise add, mul, scale and bias add, forward and backward over ragged tiles, against numpy and
torch.autograd; their errors write nothing."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels import runtime
from pg_llm.kernels.elementwise import ew_tile, scale_tile

from conftest import close
from helpers import FakePlpy, call, f32, get, put, refused

SHAPES = [  # (rows, cols, tile): sizes that are not multiples of the tile
    (5, 7, (4, 4)),
    (37, 50, (16, 16)),
    (3, 300, (256, 256)),
    (1, 13, (1, 5)),
]


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


# ---- numpy microkernels, no server -------------------------------------------------------------------------

def test_microkernels_in_numpy(rng: np.random.Generator) -> None:
    a = rng.standard_normal((3, 5), dtype=np.float32)
    b = rng.standard_normal((3, 5), dtype=np.float32)
    bias = rng.standard_normal(5, dtype=np.float32)
    close(f32(ew_tile("add", a.tobytes(), b.tobytes()), 3, 5), a + b)
    close(f32(ew_tile("mul", a.tobytes(), b.tobytes()), 3, 5), a * b)
    close(f32(ew_tile("add_bias", a.tobytes(), bias.tobytes()), 3, 5), a + bias)
    close(f32(scale_tile(a.tobytes(), -2.5), 3, 5), -2.5 * a)
    assert f32(scale_tile(a.tobytes(), 0.1), 3, 5).dtype == np.float32


def test_microkernel_errors_in_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "plpy", FakePlpy)
    with pytest.raises(FakePlpy.Error, match="tiles of 6 and 4 floats"):
        ew_tile("mul", np.ones(6, "<f4").tobytes(), np.ones(4, "<f4").tobytes())
    with pytest.raises(FakePlpy.Error, match="not whole rows of the 4-float bias tile"):
        ew_tile("add_bias", np.ones(6, "<f4").tobytes(), np.ones(4, "<f4").tobytes())


# ---- forward ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,c,tile", SHAPES)
def test_forward(conn: psycopg.Connection, rng: np.random.Generator, r: int, c: int, tile: tuple[int, int]) -> None:
    a = rng.standard_normal((r, c), dtype=np.float32)
    b = rng.standard_normal((r, c), dtype=np.float32)
    bias = rng.standard_normal(c, dtype=np.float32)
    ia, ib, ibias = put(conn, a, tile), put(conn, b, tile), put(conn, bias, tile)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    close(get(conn, call(conn, "SELECT llm_add(%s, %s)", ia, ib)), a64 + b64)
    close(get(conn, call(conn, "SELECT llm_mul(%s, %s)", ia, ib)), a64 * b64)
    close(get(conn, call(conn, "SELECT llm_scale(%s, %s)", ia, 0.37)), 0.37 * a64)
    out = call(conn, "SELECT llm_add_bias(%s, %s)", ia, ibias)
    close(get(conn, out), a64 + bias.astype(np.float64))
    shape, tile_out = conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (out,)).fetchone()
    assert shape == [r, c] and tile_out == [min(tile[0], r), min(tile[1], c)]


def test_one_dimensional(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    a = rng.standard_normal(21, dtype=np.float32)
    b = rng.standard_normal(21, dtype=np.float32)
    out = call(conn, "SELECT llm_mul(%s, %s)", put(conn, a, (1, 8)), put(conn, b, (1, 8)))
    assert get(conn, out).shape == (21,)
    close(get(conn, out), a.astype(np.float64) * b)


def test_accumulate_into_output(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    a = rng.standard_normal((9, 11), dtype=np.float32)
    b = rng.standard_normal((9, 11), dtype=np.float32)
    ia, ib = put(conn, a, (4, 4)), put(conn, b, (4, 4))
    out = put(conn, np.ones((9, 11)), (4, 4), name="acc")
    assert call(conn, "SELECT llm_add(%s, %s, %s, TRUE)", ia, ib, out) == out
    close(get(conn, out), 1 + a.astype(np.float64) + b)
    call(conn, "SELECT llm_scale(%s, %s, %s, TRUE)", ia, 2.0, out)  # axpy: out += 2 a
    close(get(conn, out), 1 + 3 * a.astype(np.float64) + b)
    call(conn, "SELECT llm_mul(%s, %s, %s)", ia, ib, out)  # without accumulate the output is overwritten
    close(get(conn, out), a.astype(np.float64) * b)


# ---- backward -----------------------------------------------------------------------------------------------

def grads(conn: psycopg.Connection, shape: tuple[int, ...], tile: tuple[int, int], n: int) -> list[int]:
    return [put(conn, np.zeros(shape), tile, name=f"g{i}") for i in range(n)]


def test_add_mul_backward_match_torch(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    a, b, dy = (rng.standard_normal((37, 50), dtype=np.float32) for _ in range(3))
    ta, tb = t64(a), t64(b)
    (ta * tb + ta + tb).backward(torch.tensor(dy, dtype=torch.float64))
    tile = (16, 16)
    ia, ib, idy = put(conn, a, tile), put(conn, b, tile), put(conn, dy, tile)
    da, db = grads(conn, a.shape, tile, 2)
    conn.execute("SELECT llm_mul_backward(%s, %s, %s, %s, %s, FALSE)", (ia, ib, idy, da, db))
    conn.execute("SELECT llm_add_backward(%s, %s, %s)", (idy, da, db))  # accumulates by default
    close(get(conn, da), ta.grad.numpy())
    close(get(conn, db), tb.grad.numpy())
    # NULL skips a gradient; a second backward accumulates
    conn.execute("SELECT llm_add_backward(%s, NULL, %s, TRUE)", (idy, db))
    close(get(conn, da), ta.grad.numpy())
    close(get(conn, db), tb.grad.numpy() + dy)


def test_same_gradient_twice_adds_up(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """y = a * a and y = a + a: both gradients go to the same tensor, even without accumulate."""
    a, dy = (rng.standard_normal((5, 7), dtype=np.float32) for _ in range(2))
    ia, idy = put(conn, a, (4, 4)), put(conn, dy, (4, 4))
    (g,) = grads(conn, a.shape, (4, 4), 1)
    conn.execute("SELECT llm_mul_backward(%s, %s, %s, %s, %s, FALSE)", (ia, ia, idy, g, g))
    close(get(conn, g), 2 * a.astype(np.float64) * dy)
    conn.execute("SELECT llm_add_backward(%s, %s, %s, FALSE)", (idy, g, g))
    close(get(conn, g), 2 * dy.astype(np.float64))


def test_scale_backward(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    x, dy = (rng.standard_normal((6, 300), dtype=np.float32) for _ in range(2))
    tx = t64(x)
    (-1.5 * tx).backward(torch.tensor(dy, dtype=torch.float64))
    idy = put(conn, dy, (4, 128))
    dx = call(conn, "SELECT llm_scale_backward(%s, %s)", idy, -1.5)  # NULL dx allocates
    close(get(conn, dx), tx.grad.numpy())
    assert call(conn, "SELECT llm_scale_backward(%s, %s, %s)", idy, -1.5, dx) == dx
    close(get(conn, dx), 2 * tx.grad.numpy())


@pytest.mark.parametrize("r,c,tile", SHAPES)
def test_add_bias_backward_matches_torch(conn: psycopg.Connection, rng: np.random.Generator, r: int, c: int,
                                         tile: tuple[int, int]) -> None:
    x, dy = (rng.standard_normal((r, c), dtype=np.float32) for _ in range(2))
    bias = rng.standard_normal(c, dtype=np.float32)
    tx, tbias = t64(x), t64(bias)
    (tx + tbias).backward(torch.tensor(dy, dtype=torch.float64))
    idy = put(conn, dy, tile)
    dx = put(conn, np.zeros((r, c)), tile, name="dx")
    dbias = put(conn, np.zeros(c), tile, name="dbias")
    conn.execute("SELECT llm_add_bias_backward(%s, %s, %s, FALSE)", (idy, dx, dbias))
    close(get(conn, dx), tx.grad.numpy())
    close(get(conn, dbias), tbias.grad.numpy())
    conn.execute("SELECT llm_add_bias_backward(%s, NULL, %s)", (idy, dbias))  # accumulate, skip dx
    close(get(conn, dbias), 2 * tbias.grad.numpy())
    close(get(conn, dx), tx.grad.numpy())


# ---- errors: clear messages, nothing written -----------------------------------------------------------------

def test_errors(conn: psycopg.Connection) -> None:
    a = put(conn, np.ones((5, 7)), (4, 4), name="a")
    b = put(conn, np.ones((5, 6)), (4, 4), name="b")
    refused(conn, r'pg_llm: add: b "b" has shape \(5, 6\), expected \(5, 7\) \(the shape of a "a"\)',
            "SELECT llm_add(%s, %s)", a, b)
    c = put(conn, np.ones((5, 7)), (2, 4), name="c")
    refused(conn, r'pg_llm: mul: a "a" and b "c" \(shape \(5, 7\)\) are cut in tiles of \{4,4\} and \{2,4\}',
            "SELECT llm_mul(%s, %s)", a, c)
    refused(conn, r"pg_llm: add: input b \(tensor id 999999\) does not exist", "SELECT llm_add(%s, 999999)", a)
    refused(conn, r"pg_llm: scale: input x \(tensor id 999999\) does not exist", "SELECT llm_scale(999999, 2)")
    refused(conn, r'pg_llm: scale: alpha is NULL \(scaling "a"\)', "SELECT llm_scale(%s, NULL)", a)
    wrong = call(conn, "SELECT llm_tensor_create('o', ARRAY[3, 3])")
    refused(conn, r'pg_llm: mul: output tensor "o" has shape \(3, 3\) tile \{3,3\}, expected shape \(5, 7\)',
            "SELECT llm_mul(%s, %s, %s)", a, a, wrong)
    refused(conn, "pg_llm: scale: output tensor id .* is also an input", "SELECT llm_scale(%s, 2, %s)", a, a)
    refused(conn, r'pg_llm: add_backward: output tensor "o" has shape \(3, 3\)',
            "SELECT llm_add_backward(%s, NULL, %s)", a, wrong)


def test_bias_errors(conn: psycopg.Connection) -> None:
    x = put(conn, np.ones((5, 7)), (4, 4), name="x")
    refused(conn, r'pg_llm: add_bias: bias "b6" has shape \(6,\), expected \(7,\) \(one value per column of x "x" '
            r"\(5, 7\)\)", "SELECT llm_add_bias(%s, %s)", x, put(conn, np.ones(6), (4, 4), name="b6"))
    refused(conn, r'pg_llm: add_bias: bias "b2d" has shape \(2, 7\), expected \(7,\)',
            "SELECT llm_add_bias(%s, %s)", x, put(conn, np.ones((2, 7)), (4, 4), name="b2d"))
    refused(conn, r'pg_llm: add_bias: bias "b3" cuts its 7 columns in tiles of 3, x "x" in tiles of 4',
            "SELECT llm_add_bias(%s, %s)", x, put(conn, np.ones(7), (1, 3), name="b3"))
    refused(conn, r"pg_llm: add_bias: input b \(tensor id 999999\) does not exist",
            "SELECT llm_add_bias(%s, 999999)", x)
    wrong = put(conn, np.zeros(6), (4, 4), name="db6")
    dx = put(conn, np.zeros((5, 7)), (4, 4), name="dx")
    refused(conn, r'pg_llm: sum_rows: output tensor "db6" has shape \(6,\)',
            "SELECT llm_add_bias_backward(%s, %s, %s)", x, dx, wrong)


def test_missing_tiles(conn: psycopg.Connection) -> None:
    a = put(conn, np.ones((5, 7)), (4, 4), name="a")
    b = put(conn, np.ones((5, 7)), (4, 4), name="b")
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 1 AND tc = 1", (b,))
    refused(conn, "pg_llm: add: wrote 3 of the 4 output tiles: an input is missing tiles",
            "SELECT llm_add(%s, %s)", a, b)
    refused(conn, "pg_llm: add_backward: wrote 3 of the 4 output tiles",
            "SELECT llm_add_backward(%s, %s, NULL)", b, a)
