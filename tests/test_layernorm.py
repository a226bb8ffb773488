"""layernorm forward and backward over tiles, against torch (float64) and torch.autograd, with ragged tiles."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch
import torch.nn.functional as F

from pg_llm.kernels.layernorm import layernorm_backward_block, layernorm_block

from conftest import close
from helpers import call, get, put

SHAPES = [  # (rows, cols, tile): sizes that are not multiples of the tile
    (5, 7, (4, 4)),
    (37, 50, (16, 16)),
    (3, 300, (256, 256)),
    (1, 9, (1, 2)),
]


def torch_ln(x: np.ndarray, g: np.ndarray, b: np.ndarray, dy: np.ndarray, eps: float = 1e-5) -> tuple:
    tx, tg, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, g, b))
    y = F.layer_norm(tx, (x.shape[1],), tg, tb, eps)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return y.detach().numpy(), tx.grad.numpy(), tg.grad.numpy(), tb.grad.numpy()


def data(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    x = (rng.standard_normal((rows, cols)) * 3 + 1).astype(np.float32)
    g = (1 + 0.5 * rng.standard_normal(cols)).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    dy = rng.standard_normal((rows, cols)).astype(np.float32)
    return x, g, b, dy


def split(a: np.ndarray, w: int) -> list[bytes]:
    return [np.ascontiguousarray(a[:, i:i + w]).tobytes() for i in range(0, a.shape[1], w)]


def test_microkernels_in_numpy(rng: np.random.Generator) -> None:
    x, g, b, dy = data(rng, 6, 11)
    want, dx, dg, db = torch_ln(x, g, b, dy)
    out = layernorm_block(split(x, 4), g.tobytes(), b.tobytes(), 6, 11, 1e-5)
    assert [len(t) for t in out] == [4 * 6 * 4, 4 * 6 * 4, 4 * 6 * 3]
    close(np.hstack([np.frombuffer(t, "<f4").reshape(6, -1) for t in out]), want)
    parts = layernorm_backward_block(split(x, 4), split(dy, 4), g.tobytes(), 6, 11, 1e-5)
    assert len(parts) == 9
    close(np.hstack([np.frombuffer(t, "<f4").reshape(6, -1) for t in parts[:3]]), dx)
    close(np.concatenate([np.frombuffer(t, "<f4") for t in parts[3:6]]), dg)
    close(np.concatenate([np.frombuffer(t, "<f4") for t in parts[6:]]), db)


@pytest.mark.parametrize("rows,cols,tile", SHAPES)
def test_forward(conn: psycopg.Connection, rng: np.random.Generator, rows: int, cols: int,
                 tile: tuple[int, int]) -> None:
    x, g, b, dy = data(rng, rows, cols)
    vt = (1, tile[1])
    out = call(conn, "SELECT llm_layernorm(%s, %s, %s)", put(conn, x, tile), put(conn, g, vt), put(conn, b, vt))
    want = torch_ln(x, g, b, dy)[0]
    close(get(conn, out), want)
    shape, tile_out = conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (out,)).fetchone()
    assert shape == [rows, cols] and tile_out == [min(tile[0], rows), min(tile[1], cols)]


def test_forward_eps_and_accumulate(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    x, g, b, dy = data(rng, 9, 13)
    x[0] = 2.0  # a constant row: var 0, normalized by sqrt(eps)
    ix, ig, ib = put(conn, x, (4, 5)), put(conn, g, (1, 5)), put(conn, b, (1, 5))
    out = call(conn, "SELECT llm_layernorm(%s, %s, %s, p_eps => 0.1)", ix, ig, ib)
    want = torch_ln(x, g, b, dy, 0.1)[0]
    close(get(conn, out), want)
    call(conn, "SELECT llm_layernorm(%s, %s, %s, %s, 0.1, TRUE)", ix, ig, ib, out)
    close(get(conn, out), 2 * want)


@pytest.mark.parametrize("rows,cols,tile", SHAPES)
def test_backward_matches_torch(conn: psycopg.Connection, rng: np.random.Generator, rows: int, cols: int,
                                tile: tuple[int, int]) -> None:
    x, g, b, dy = data(rng, rows, cols)
    _, dx, dg, db = torch_ln(x, g, b, dy)
    vt = [1, min(tile[1], cols)]
    ix, ig, idy = put(conn, x, tile), put(conn, g, (1, tile[1])), put(conn, dy, tile)
    tdx = call(conn, "SELECT llm_tensor_create('dx', %s, %s)", [rows, cols], [min(tile[0], rows), vt[1]])
    tdg = call(conn, "SELECT llm_tensor_create('dg', %s, %s)", [cols], vt)
    tdb = call(conn, "SELECT llm_tensor_create('db', %s, %s)", [cols], vt)
    conn.execute("SELECT llm_layernorm_backward(%s, %s, %s, %s, %s, %s, FALSE)", (ix, ig, idy, tdx, tdg, tdb))
    close(get(conn, tdx), dx)
    close(get(conn, tdg), dg)
    close(get(conn, tdb), db)
    # accumulate: a second backward adds the same gradients again; NULL skips an output
    conn.execute("SELECT llm_layernorm_backward(%s, %s, %s, NULL, %s, %s)", (ix, ig, idy, tdg, tdb))
    close(get(conn, tdx), dx)
    close(get(conn, tdg), 2 * dg)
    close(get(conn, tdb), 2 * db)


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    return conn.execute("SELECT (SELECT count(*) FROM llm_tile), (SELECT count(*) FROM llm_tensor)").fetchone()


def test_errors(conn: psycopg.Connection) -> None:
    x = put(conn, np.ones((6, 10)), (4, 4))
    g = put(conn, np.ones(10), (1, 4))
    g_short = put(conn, np.ones(9), (1, 4))
    g_tiled = put(conn, np.ones(10), (1, 5))
    g_2d = put(conn, np.ones((2, 10)), (1, 4))
    dy_tiled = put(conn, np.ones((6, 10)), (3, 4))
    dx_wrong = call(conn, "SELECT llm_tensor_create('dx', ARRAY[6, 9], ARRAY[4, 4])")
    before = counts(conn)
    raises = pytest.raises
    with raises(psycopg.errors.RaiseException, match=r'layernorm: g "t" has shape \(9,\), expected \(10,\)'):
        conn.execute("SELECT llm_layernorm(%s, %s, %s)", (x, g_short, g))
    with raises(psycopg.errors.RaiseException, match=r'layernorm: b "t" has shape \(2, 10\), expected \(10,\)'):
        conn.execute("SELECT llm_layernorm(%s, %s, %s)", (x, g, g_2d))
    with raises(psycopg.errors.RaiseException, match=r'layernorm: g "t" is cut in column tiles of 5, expected 4'):
        conn.execute("SELECT llm_layernorm(%s, %s, %s)", (x, g_tiled, g))
    with raises(psycopg.errors.RaiseException, match=r"layernorm: input b \(tensor id 999999\) does not exist"):
        conn.execute("SELECT llm_layernorm(%s, %s, 999999)", (x, g))
    with raises(psycopg.errors.RaiseException, match=r"layernorm: eps must be >= 0"):
        conn.execute("SELECT llm_layernorm(%s, %s, %s, p_eps => -1)", (x, g, g))
    with raises(psycopg.errors.RaiseException, match=r'layernorm: output tensor "dx" has shape \(6, 9\)'):
        conn.execute("SELECT llm_layernorm(%s, %s, %s, %s)", (x, g, g, dx_wrong))
    with raises(psycopg.errors.RaiseException,
                match=r'layernorm_backward: dy "t" has shape \(6, 10\) tile \{3,4\}, expected shape \(6, 10\) '
                      r'tile \{4,4\}'):
        conn.execute("SELECT llm_layernorm_backward(%s, %s, %s, NULL, NULL, NULL)", (x, g, dy_tiled))
    with raises(psycopg.errors.RaiseException, match=r'layernorm_backward: output tensor "dx" has shape \(6, 9\)'):
        conn.execute("SELECT llm_layernorm_backward(%s, %s, %s, %s, NULL, NULL)", (x, g, x, dx_wrong))
    with raises(psycopg.errors.RaiseException, match=r"layernorm_backward: input dy \(tensor id 999999\)"):
        conn.execute("SELECT llm_layernorm_backward(%s, %s, 999999, NULL, NULL, NULL)", (x, g))
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tc = 1", (g,))
    with raises(psycopg.errors.RaiseException, match=r'layernorm: g "t" of shape \(10,\) is missing tiles'):
        conn.execute("SELECT llm_layernorm(%s, %s, %s)", (x, g, g_tiled))
    assert counts(conn) == (before[0] - 1, before[1])  # nothing written (only the deleted tile is gone)
