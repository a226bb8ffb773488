"""linear (fused x @ W + b [+ GELU]) forward and backward: against numpy/torch, bit-identical to the unfused
chain llm_gelu(llm_add_bias(llm_matmul(x, W), b)), with ragged tiles and tiny panel budgets (many panels)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels.gelu import gelu_tile
from pg_llm.kernels.linear import linear_blocks

from conftest import close
from helpers import call, get, param, put

SHAPES = [  # (m, k, n, tile): sizes that are not multiples of the tile
    (5, 7, 3, (4, 4)),
    (37, 50, 29, (16, 16)),
    (3, 300, 1, (256, 256)),
]


def gelu(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def grid(x: np.ndarray, tile: tuple[int, int]) -> list[bytes]:
    th, tw = tile
    return [np.ascontiguousarray(x[r:r + th, c:c + tw]).tobytes()
            for r in range(0, x.shape[0], th) for c in range(0, x.shape[1], tw)]


@pytest.mark.parametrize("act,pre,res", [(False, False, False), (True, False, False), (True, True, False),
                                         (False, False, True)])
def test_panel_in_numpy(rng: np.random.Generator, act: bool, pre: bool, res: bool) -> None:
    m, k, n = 10, 9, 7
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    out: dict[int, np.ndarray] = {0: np.zeros((m, n), np.float32), 1: np.zeros((m, n), np.float32)}
    bias = [b[c:c + 3].tobytes() for c in range(0, n, 3)]
    r = rng.standard_normal((m, n), dtype=np.float32)
    for kind, i, j, data in linear_blocks(x, w, 0, 0, 4, 3, bias, act, pre, grid(r, (4, 3)) if res else ()):
        out[kind][i * 4:(i + 1) * 4, j * 3:(j + 1) * 3] = np.frombuffer(data, "<f4").reshape(
            min(4, m - i * 4), min(3, n - j * 3))
    want = x.astype(np.float64) @ w + b
    close(out[0], (gelu(want) if act else want) + (r if res else 0))
    if pre:
        close(out[1], want)
        assert np.array_equal(out[0], np.frombuffer(gelu_tile(out[1].tobytes()), "<f4").reshape(m, n))


@pytest.fixture(params=["default", "tiny"])
def budget(conn: psycopg.Connection, request: pytest.FixtureRequest) -> Iterator[str]:
    """The default panel budget (one call) and a tiny one (one call per output tile)."""
    if request.param == "tiny":
        conn.execute("SET pg_llm.matmul_panel_floats = '1'")
    yield request.param
    conn.execute("RESET pg_llm.matmul_panel_floats")


@pytest.mark.parametrize("m,k,n,tile", SHAPES)
@pytest.mark.parametrize("act", [False, True])
def test_forward_matches_unfused_chain(conn: psycopg.Connection, rng: np.random.Generator, budget: str, m: int,
                                       k: int, n: int, tile: tuple[int, int], act: bool) -> None:
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    ix, iw = put(conn, x, tile), put(conn, w, tile)
    ib = put(conn, b, (1, tile[1]))
    got = get(conn, call(conn, "SELECT llm_linear(%s, %s, %s, %s)", ix, iw, ib, act))
    want = x.astype(np.float64) @ w + b
    close(got, gelu(want) if act else want)
    chain = call(conn, "SELECT llm_add_bias(llm_matmul(%s, %s), %s)", ix, iw, ib)
    if act:
        chain = call(conn, "SELECT llm_gelu(%s)", chain)
    assert np.array_equal(got, get(conn, chain))  # the same float32 operations
    assert np.array_equal(get(conn, call(conn, "SELECT llm_linear(%s, %s)", ix, iw)),
                          get(conn, call(conn, "SELECT llm_matmul(%s, %s)", ix, iw)))
    r = put(conn, rng.standard_normal((m, n), dtype=np.float32), (tile[0], tile[1]))
    fused = get(conn, call(conn, "SELECT llm_linear(%s, %s, %s, %s, p_residual => %s)", ix, iw, ib, act, r))
    assert np.array_equal(fused, get(conn, call(conn, "SELECT llm_add(%s, %s)", r, chain)))


def test_pre_activation_and_accumulate(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    x, w = rng.standard_normal((20, 12), dtype=np.float32), rng.standard_normal((12, 9), dtype=np.float32)
    b = rng.standard_normal(9, dtype=np.float32)
    ix, iw, ib = put(conn, x, (8, 8)), put(conn, w, (8, 8)), put(conn, b, (1, 8))
    pre = call(conn, "SELECT llm_tensor_create('pre', ARRAY[20, 9], ARRAY[8, 8])")
    out = call(conn, "SELECT llm_linear(%s, %s, %s, TRUE, p_pre => %s)", ix, iw, ib, pre)
    want = x.astype(np.float64) @ w + b
    close(get(conn, pre), want)
    close(get(conn, out), gelu(want))
    call(conn, "SELECT llm_linear(%s, %s, %s, FALSE, %s, TRUE)", ix, iw, ib, out)
    close(get(conn, out), gelu(want) + want)


def test_backward_matches_torch(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    m, k, n, tile = 37, 50, 29, (16, 16)
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    ix, iw, idy = put(conn, x, tile), put(conn, w, tile), put(conn, dy, tile)
    dx = call(conn, "SELECT llm_tensor_create('dx', ARRAY[37, 50], ARRAY[16, 16])")
    dw = call(conn, "SELECT llm_tensor_create('dw', ARRAY[50, 29], ARRAY[16, 16])")
    db = call(conn, "SELECT llm_tensor_create('db', ARRAY[29], ARRAY[1, 16])")
    conn.execute("SELECT llm_linear_backward(%s, %s, %s, %s, %s, %s, FALSE)", (ix, iw, idy, dx, dw, db))
    tx, tw = torch.tensor(x, dtype=torch.float64, requires_grad=True), torch.tensor(w, dtype=torch.float64,
                                                                                   requires_grad=True)
    tb = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    (tx @ tw + tb).backward(torch.tensor(dy, dtype=torch.float64))
    close(get(conn, dx), tx.grad.numpy())
    close(get(conn, dw), tw.grad.numpy())
    close(get(conn, db), tb.grad.numpy())


@pytest.mark.parametrize("wshape,wtile,bshape,btile,match", [
    ((9, 4), (8, 8), (4,), (1, 8), "weight .* has shape"),
    ((8, 4), (4, 4), (4,), (1, 4), "cut the inner dimension"),
    ((8, 4), (8, 8), (5,), (1, 8), "bias .* has shape"),
])
def test_errors(conn: psycopg.Connection, wshape: tuple, wtile: tuple, bshape: tuple, btile: tuple,
                match: str) -> None:
    ix = put(conn, np.ones((3, 8), np.float32), (8, 8))
    iw, ib = put(conn, np.ones(wshape, np.float32), wtile), put(conn, np.ones(bshape, np.float32), btile)
    with pytest.raises(psycopg.errors.RaiseException, match="pg_llm: linear: .*" + match):
        conn.execute("SELECT llm_linear(%s, %s, %s)", (ix, iw, ib))
    ok = put(conn, np.ones((8, 4), np.float32), (8, 8))
    with pytest.raises(psycopg.errors.RaiseException, match="pg_llm: linear: residual .* has shape"):
        conn.execute("SELECT llm_linear(%s, %s, p_residual => %s)", (ix, ok, ix))
    with pytest.raises(psycopg.errors.RaiseException, match="pg_llm: linear: output tensors"):
        conn.execute("SELECT llm_linear(%s, %s, NULL, FALSE, %s)", (ix, ok, ix))


def test_durable_weight_cached_and_updated(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """A durable W comes from the weight cache (shared with llm_matmul); an update of W is seen."""

    x, w = rng.standard_normal((20, 12), dtype=np.float32), rng.standard_normal((12, 9), dtype=np.float32)
    ix = put(conn, x, (8, 8))
    iw = param(conn, w, "w", "lin_cache", (8, 8), replace=True)
    for _ in range(2):
        got = get(conn, call(conn, "SELECT llm_linear(%s, %s)", ix, iw))
        assert np.array_equal(got, get(conn, call(conn, "SELECT llm_matmul(%s, %s)", ix, iw)))
        close(got, x.astype(np.float64) @ w)
    conn.execute("UPDATE llm_tile SET data = llm_internal.llm_mk_scale(data, 2.0) WHERE tensor_id = %s", (iw,))
    close(get(conn, call(conn, "SELECT llm_linear(%s, %s)", ix, iw)), x.astype(np.float64) @ (2 * w))
