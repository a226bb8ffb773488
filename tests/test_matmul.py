"""matmul forward and backward over tiles, against numpy and torch.autograd, with ragged tiles."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch
from conftest import close
from helpers import call, get, put

from pg_llm.ops.matmul import matmul_tile

SHAPES = [  # (m, k, n, tile): sizes that are not multiples of the tile
    (5, 7, 3, (4, 4)),
    (37, 50, 29, (16, 16)),
    (64, 96, 80, (32, 32)),
    (3, 300, 1, (256, 256)),
]


def test_microkernel_in_numpy(rng: np.random.Generator) -> None:
    a = rng.standard_normal((6, 9), dtype=np.float32)
    b = rng.standard_normal((9, 4), dtype=np.float32)
    tiles_a = [a[:, :5].tobytes(), a[:, 5:].tobytes()]
    tiles_b = [b[:5].tobytes(), b[5:].tobytes()]
    out = np.frombuffer(matmul_tile(np, tiles_a, tiles_b, 6, 4, False, False), "<f4").reshape(6, 4)
    close(out, a @ b)


@pytest.mark.parametrize("m,k,n,tile", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_forward(conn: psycopg.Connection, rng: np.random.Generator, m: int, k: int, n: int,
                 tile: tuple[int, int], ta: bool, tb: bool) -> None:
    a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
    out = call(conn, "SELECT llm_matmul(%s, %s, NULL, %s, %s)", put(conn, a, tile), put(conn, b, tile), ta, tb)
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    close(get(conn, out), want)
    shape, tile_out = conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (out,)).fetchone()
    assert shape == [m, n] and tile_out == [min(tile[0], m), min(tile[1], n)]


def test_backward_matches_torch(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    a = rng.standard_normal((37, 50), dtype=np.float32)
    b = rng.standard_normal((50, 29), dtype=np.float32)
    dy = rng.standard_normal((37, 29), dtype=np.float32)
    ta, tb = torch.tensor(a, dtype=torch.float64, requires_grad=True), torch.tensor(b, dtype=torch.float64,
                                                                                   requires_grad=True)
    (ta @ tb).backward(torch.tensor(dy, dtype=torch.float64))
    ia, ib, idy = put(conn, a, (16, 16)), put(conn, b, (16, 16)), put(conn, dy, (16, 16))
    da = call(conn, "SELECT llm_tensor_create('da', ARRAY[37, 50], ARRAY[16, 16])")
    db = call(conn, "SELECT llm_tensor_create('db', ARRAY[50, 29], ARRAY[16, 16])")
    conn.execute("SELECT llm_matmul_backward(%s, %s, %s, %s, %s, FALSE)", (ia, ib, idy, da, db))
    close(get(conn, da), ta.grad.numpy())
    close(get(conn, db), tb.grad.numpy())
    # accumulate: a second backward adds the same gradient again
    conn.execute("SELECT llm_matmul_backward(%s, %s, %s, %s, %s, TRUE)", (ia, ib, idy, da, db))
    close(get(conn, db), 2 * tb.grad.numpy())


def test_tied_projection_shape(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """logits = x @ wte^T with a vocabulary that is not a multiple of the tile (like 50257)."""
    x = rng.standard_normal((7, 48), dtype=np.float32)
    wte = rng.standard_normal((301, 48), dtype=np.float32)
    out = call(conn, "SELECT llm_matmul(%s, %s, p_tb => TRUE)", put(conn, x, (8, 16)), put(conn, wte, (64, 16)))
    close(get(conn, out), x.astype(np.float64) @ wte.T.astype(np.float64))


def test_errors(conn: psycopg.Connection) -> None:
    a = put(conn, np.ones((3, 4)), (2, 2))
    b = put(conn, np.ones((5, 2)), (2, 2))
    with pytest.raises(psycopg.errors.RaiseException, match="inner dimensions differ"):
        conn.execute("SELECT llm_matmul(%s, %s)", (a, b))
    c = put(conn, np.ones((4, 2)), (3, 2))
    with pytest.raises(psycopg.errors.RaiseException, match="inner dimension 4 in tiles of 2 and 3"):
        conn.execute("SELECT llm_matmul(%s, %s)", (a, c))
    with pytest.raises(psycopg.errors.RaiseException, match=r"input b \(tensor id 999999\) does not exist"):
        conn.execute("SELECT llm_matmul(%s, 999999)", (a,))
    wrong = call(conn, "SELECT llm_tensor_create('o', ARRAY[3, 3])")
    n_before = call(conn, "SELECT count(*) FROM llm_tile")
    with pytest.raises(psycopg.errors.RaiseException, match=r'output tensor "o" has shape \(3, 3\)'):
        conn.execute("SELECT llm_matmul(%s, %s, %s)", (a, put(conn, np.ones((4, 2)), (2, 2)), wrong))
    assert call(conn, "SELECT count(*) FROM llm_tile") == n_before + 2  # only the new input (4x2 in 2x2 tiles) was written
