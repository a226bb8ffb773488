"""matmul forward and backward over tiles, against numpy and torch.autograd, with ragged tiles; the panel
kernel with the default budget (one call) and tiny budgets (one call per output tile, mixed panels)."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels.matmul import matmul_panel, matmul_tile, panel_box, read_tiles

from conftest import close
from helpers import call, get, put

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
    out = np.frombuffer(matmul_tile(tiles_a, tiles_b, 6, 4, False, False), "<f4").reshape(6, 4)
    close(out, a @ b)


def tile_grid(x: np.ndarray, tile: tuple[int, int]) -> list[bytes]:
    th, tw = tile
    return [np.ascontiguousarray(x[r:r + th, c:c + tw]).tobytes()
            for r in range(0, x.shape[0], th) for c in range(0, x.shape[1], tw)]


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_panel_microkernel_in_numpy(rng: np.random.Generator, ta: bool, tb: bool) -> None:
    m, k, n, tile = 10, 9, 7, (4, 3)
    a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
    geom = [*a.shape, *tile, 0, -(-a.shape[0] // 4), 0, -(-a.shape[1] // 3)]
    geom_b = [*b.shape, *tile, 0, -(-b.shape[0] // 4), 0, -(-b.shape[1] // 3)]
    got = np.zeros((m, n), np.float32)
    tm, tn = (3 if ta else 4), (4 if tb else 3)
    for i, j, data in matmul_panel(tile_grid(a, tile), geom, ta, tile_grid(b, tile), geom_b, tb):
        got[i * tm:(i + 1) * tm, j * tn:(j + 1) * tn] = np.frombuffer(data, "<f4").reshape(
            min(tm, m - i * tm), min(tn, n - j * tn))
    close(got, (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64))


def test_panel_block_boxes() -> None:
    """A panel's tile box, and the read of its tiles asks for exactly that box (fake plpy: no server)."""
    class FakePlpy:
        def prepare(self, sql: str, types: list[str]) -> str:
            assert "ORDER BY tr, tc" in sql
            return "plan"

        def execute(self, plan: str, args: list[int]) -> list[dict[str, bytes]]:
            self.args = args
            return [{"data": b"x"}]
    plpy, gd = FakePlpy(), {}
    box = panel_box([10, 9, 4, 3], False, 1, 2)  # rows in 3 tiles, cols in 3 tiles
    read_tiles(plpy, gd, 7, box)
    geom = [10, 9, 4, 3] + box
    assert plpy.args == [7, 2, 3, 0, 3] and geom == [10, 9, 4, 3, 2, 3, 0, 3] and gd["llm_panel_plan"] == "plan"
    read_tiles(plpy, gd, 7, panel_box([10, 9, 4, 3], True, 0, 2))
    assert plpy.args == [7, 0, 3, 0, 2]


@pytest.mark.parametrize("budget", [None, 1, 3000])
@pytest.mark.parametrize("m,k,n,tile", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_forward(conn: psycopg.Connection, rng: np.random.Generator, m: int, k: int, n: int,
                 tile: tuple[int, int], ta: bool, tb: bool, budget: int | None) -> None:
    """budget (pg_llm.matmul_panel_floats): None = one panel, 1 = one call per output tile, 3000 = a mix."""
    a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
    conn.execute("SELECT set_config('pg_llm.matmul_panel_floats', %s, FALSE)", ("" if budget is None else str(budget),))
    out = call(conn, "SELECT llm_matmul(%s, %s, NULL, %s, %s)", put(conn, a, tile), put(conn, b, tile), ta, tb)
    conn.execute("SELECT set_config('pg_llm.matmul_panel_floats', '', FALSE)")
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


def test_backward_of_the_transposed_product_matches_torch(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """y = a @ b^T (the tied logits x @ wte^T): what llm_backward runs for a matmul recorded with tb."""
    a = rng.standard_normal((13, 40), dtype=np.float32)
    b = rng.standard_normal((35, 40), dtype=np.float32)  # ragged: 35 rows, tiles of 16
    dy = rng.standard_normal((13, 35), dtype=np.float32)
    ta, tb = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (a, b))
    (ta @ tb.T).backward(torch.tensor(dy, dtype=torch.float64))
    ia, ib, idy = put(conn, a, (8, 16)), put(conn, b, (16, 16)), put(conn, dy, (8, 16))  # dy tiled like y
    da = call(conn, "SELECT llm_internal.llm_tensor_like(%s, 'da')", ia)
    db = call(conn, "SELECT llm_internal.llm_tensor_like(%s, 'db')", ib)
    conn.execute("SELECT llm_matmul_backward(%s, %s, %s, %s, %s, FALSE, TRUE)", (ia, ib, idy, da, db))
    close(get(conn, da), ta.grad.numpy())
    close(get(conn, db), tb.grad.numpy())


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
    # only the new input (4x2 in 2x2 tiles) was written
    assert call(conn, "SELECT count(*) FROM llm_tile") == n_before + 2
