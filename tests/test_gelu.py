"""GELU (tanh form) forward against torch's float32 gelu(approximate='tanh'), backward against torch.autograd in
float64, over ragged tiles; errors write nothing."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch
import torch.nn.functional as F

from pg_llm.kernels import runtime
from pg_llm.kernels.gelu import gelu_backward_tile, gelu_tile

from conftest import close
from helpers import FakePlpy, call, f32, get, put, refused

SHAPES = [  # (rows, cols, tile): sizes that are not multiples of the tile
    (5, 7, (4, 4)),
    (37, 50, (16, 16)),
    (3, 300, (256, 256)),
    (1, 13, (1, 5)),
]


def torch_gelu(x: np.ndarray) -> np.ndarray:
    return F.gelu(torch.from_numpy(x), approximate="tanh").numpy()


def torch_grad(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    F.gelu(tx, approximate="tanh").backward(torch.tensor(dy, dtype=torch.float64))
    return tx.grad.numpy()


def inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values plus the awkward ones: zero, saturated tails, large magnitudes."""
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    flat = x.reshape(-1)
    special = np.array([0.0, -0.0, 1e-8, -1e-8, 6.0, -6.0, 12.0, -12.0, 40.0, -40.0], np.float32)
    flat[: min(flat.size, special.size)] = special[: flat.size]
    return x


# ---- numpy microkernels, no server -------------------------------------------------------------------------

def test_microkernels_in_numpy(rng: np.random.Generator) -> None:
    x = inputs(rng, (64, 33))
    dy = rng.standard_normal((64, 33), dtype=np.float32)
    y = f32(gelu_tile(x.tobytes()), 64, 33)
    assert y.dtype == np.float32
    close(y, torch_gelu(x))
    close(f32(gelu_backward_tile(x.tobytes(), dy.tobytes()), 64, 33), torch_grad(x, dy))


def test_derivative_against_finite_differences(rng: np.random.Generator) -> None:
    x = rng.uniform(-5, 5, 200)
    h = 1e-6

    def fwd(v: np.ndarray) -> np.ndarray:  # the forward in float64: its central differences give gelu'
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

    fd = (fwd(x + h) - fwd(x - h)) / (2 * h)
    got = f32(gelu_backward_tile(x.astype(np.float32).tobytes(), np.ones(200, "<f4").tobytes()), 200)
    close(got, fd, rel=1e-5)


def test_microkernel_errors_in_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "plpy", FakePlpy)
    with pytest.raises(FakePlpy.Error, match="x and dy tiles of 6 and 4 floats"):
        gelu_backward_tile(np.ones(6, "<f4").tobytes(), np.ones(4, "<f4").tobytes())


# ---- forward and backward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("r,c,tile", SHAPES)
def test_forward(conn: psycopg.Connection, rng: np.random.Generator, r: int, c: int, tile: tuple[int, int]) -> None:
    x = inputs(rng, (r, c))
    out = call(conn, "SELECT llm_gelu(%s)", put(conn, x, tile))
    close(get(conn, out), torch_gelu(x))
    shape, tile_out = conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (out,)).fetchone()
    assert shape == [r, c] and tile_out == [min(tile[0], r), min(tile[1], c)]


@pytest.mark.parametrize("r,c,tile", SHAPES)
def test_backward_matches_torch(conn: psycopg.Connection, rng: np.random.Generator, r: int, c: int,
                                tile: tuple[int, int]) -> None:
    x = inputs(rng, (r, c))
    dy = rng.standard_normal((r, c), dtype=np.float32)
    ix, idy = put(conn, x, tile), put(conn, dy, tile)
    dx = call(conn, "SELECT llm_gelu_backward(%s, %s)", ix, idy)  # NULL dx allocates
    want = torch_grad(x, dy)
    close(get(conn, dx), want)
    assert call(conn, "SELECT llm_gelu_backward(%s, %s, %s)", ix, idy, dx) == dx  # accumulates by default
    close(get(conn, dx), 2 * want)
    call(conn, "SELECT llm_gelu_backward(%s, %s, %s, FALSE)", ix, idy, dx)
    close(get(conn, dx), want)


def test_one_dimensional_and_accumulate(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    x = inputs(rng, (19,))
    ix = put(conn, x, (1, 8))
    out = put(conn, np.ones(19), (1, 8), name="acc")
    assert call(conn, "SELECT llm_gelu(%s, %s, TRUE)", ix, out) == out
    close(get(conn, out), 1 + torch_gelu(x).astype(np.float64))
    assert get(conn, call(conn, "SELECT llm_gelu(%s)", ix)).shape == (19,)


# ---- errors: clear messages, nothing written -----------------------------------------------------------------

def test_errors(conn: psycopg.Connection) -> None:
    x = put(conn, np.ones((5, 7)), (4, 4), name="x")
    refused(conn, r"pg_llm: gelu: input x \(tensor id 999999\) does not exist", "SELECT llm_gelu(999999)")
    refused(conn, r"pg_llm: gelu_backward: input dy \(tensor id 999999\) does not exist",
            "SELECT llm_gelu_backward(%s, 999999)", x)
    dy = put(conn, np.ones((7, 5)), (4, 4), name="dy")
    refused(conn, r'pg_llm: gelu_backward: dy "dy" has shape \(7, 5\), expected \(5, 7\) \(the shape of x "x"\)',
            "SELECT llm_gelu_backward(%s, %s)", x, dy)
    dy2 = put(conn, np.ones((5, 7)), (4, 2), name="dy2")
    refused(conn, r'pg_llm: gelu_backward: x "x" and dy "dy2" \(shape \(5, 7\)\) are cut in tiles of \{4,4\} and '
            r"\{4,2\}", "SELECT llm_gelu_backward(%s, %s)", x, dy2)
    wrong = call(conn, "SELECT llm_tensor_create('o', ARRAY[5, 7], ARRAY[2, 2])")
    refused(conn, r'pg_llm: gelu: output tensor "o" has shape \(5, 7\) tile \{2,2\}, expected shape \(5, 7\) tile '
            r"\{4,4\}", "SELECT llm_gelu(%s, %s)", x, wrong)
    refused(conn, "pg_llm: gelu: output tensor id .* is also an input", "SELECT llm_gelu(%s, %s)", x, x)


def test_missing_tiles(conn: psycopg.Connection) -> None:
    x = put(conn, np.ones((5, 7)), (4, 4), name="x")
    dy = put(conn, np.ones((5, 7)), (4, 4), name="dy")
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 0 AND tc = 0", (dy,))
    refused(conn, "pg_llm: gelu_backward: wrote 3 of the 4 output tiles", "SELECT llm_gelu_backward(%s, %s)", x, dy)
