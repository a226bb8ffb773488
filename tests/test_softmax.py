"""Causal (per head) and plain softmax forward and backward over tiles, against torch and torch.autograd."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels.softmax import softmax_backward_block, softmax_block

from conftest import close
from helpers import call, get, put

SHAPES = [  # (heads, seq_len, tile): H*T and T not multiples of the tile
    (1, 5, (4, 4)),
    (3, 7, (4, 3)),
    (2, 37, (16, 16)),
    (4, 13, (5, 256)),
]


def torch_softmax(s: np.ndarray, seq_len: int, scale: float, causal: bool, dp: np.ndarray) -> tuple:
    ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    z = scale * ts
    if causal:
        q = torch.arange(s.shape[0]) % seq_len
        z = z.masked_fill(torch.arange(s.shape[1])[None, :] > q[:, None], float("-inf"))
    p = torch.softmax(z, dim=1)
    p.backward(torch.tensor(dp, dtype=torch.float64))
    return p.detach().numpy(), ts.grad.numpy()


def split(a: np.ndarray, w: int) -> list[bytes]:
    return [np.ascontiguousarray(a[:, i:i + w]).tobytes() for i in range(0, a.shape[1], w)]


def join(tiles: list[bytes], rows: int) -> np.ndarray:
    return np.hstack([np.frombuffer(t, "<f4").reshape(rows, -1) for t in tiles])


def test_microkernels_in_numpy(rng: np.random.Generator) -> None:
    s = rng.standard_normal((12, 5), dtype=np.float32)  # row r is query position r mod 5
    dp = rng.standard_normal((12, 5), dtype=np.float32)
    p_want, ds_want = torch_softmax(s, 5, 0.7, True, dp)
    block = slice(4, 10)  # a block that starts mid-head: query positions 4, 0, 1, 2, 3, 4
    p = join(softmax_block(split(s[block], 2), 6, 5, 4, 5, 0.7, True), 6)
    close(p, p_want[block])
    assert (p[1, 1:] == 0).all() and p[0].sum() == pytest.approx(1, abs=1e-6)
    ds = join(softmax_backward_block(split(p, 2), split(dp[block], 2), 6, 5, 0.7), 6)
    close(ds, ds_want[block])
    plain = join(softmax_block(split(s, 3), 12, 5, 0, 5, 1.0, False), 12)
    close(plain, torch.softmax(torch.tensor(s, dtype=torch.float64), dim=1).numpy())


@pytest.mark.parametrize("heads,seq_len,tile", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_forward_backward(conn: psycopg.Connection, rng: np.random.Generator, heads: int, seq_len: int,
                          tile: tuple[int, int], causal: bool) -> None:
    s = (3 * rng.standard_normal((heads * seq_len, seq_len))).astype(np.float32)
    dp = rng.standard_normal(s.shape).astype(np.float32)
    scale = 1 / np.sqrt(8)
    p_want, ds_want = torch_softmax(s, seq_len, scale, causal, dp)
    ip = call(conn, "SELECT llm_softmax_causal(%s, %s, %s, p_causal => %s)", put(conn, s, tile), seq_len, scale,
              causal)
    p = get(conn, ip)
    close(p, p_want)
    if causal:
        q = np.arange(s.shape[0]) % seq_len
        assert (p[np.arange(seq_len)[None, :] > q[:, None]] == 0).all()  # masked: exactly zero
    shape, tile_out = conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (ip,)).fetchone()
    assert shape == list(s.shape) and tile_out == [min(tile[0], s.shape[0]), min(tile[1], seq_len)]
    ids = call(conn, "SELECT llm_softmax_causal_backward(%s, %s, %s)", ip, put(conn, dp, tile), scale)
    close(get(conn, ids), ds_want)


def test_plain_softmax_any_shape_and_accumulate(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    s = rng.standard_normal((9, 23), dtype=np.float32)
    dp = rng.standard_normal((9, 23), dtype=np.float32)
    p_want, ds_want = torch_softmax(s, 23, 2.0, False, dp)
    ip = call(conn, "SELECT llm_softmax_causal(%s, NULL, 2.0, p_causal => FALSE)", put(conn, s, (4, 8)))
    close(get(conn, ip), p_want)
    idp = put(conn, dp, (4, 8))
    ids = call(conn, "SELECT llm_softmax_causal_backward(%s, %s, 2.0)", ip, idp)
    call(conn, "SELECT llm_softmax_causal_backward(%s, %s, 2.0, %s, TRUE)", ip, idp, ids)
    close(get(conn, ids), 2 * ds_want)


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    return conn.execute("SELECT (SELECT count(*) FROM llm_tile), (SELECT count(*) FROM llm_tensor)").fetchone()


def test_errors(conn: psycopg.Connection) -> None:
    s = put(conn, np.ones((10, 5)), (4, 4), name="scores")
    s_bad = put(conn, np.ones((11, 5)), (4, 4), name="scores11")
    dp_tiled = put(conn, np.ones((10, 5)), (4, 2), name="dp")
    wrong = call(conn, "SELECT llm_tensor_create('o', ARRAY[10, 4])")
    before = counts(conn)
    raises = pytest.raises
    with raises(psycopg.errors.RaiseException,
                match=r'softmax_causal: scores "scores11" have shape \(11, 5\), expected \(H\*T, T\) with T = 5'):
        conn.execute("SELECT llm_softmax_causal(%s, 5)", (s_bad,))
    with raises(psycopg.errors.RaiseException, match=r'scores "scores" have shape \(10, 5\), expected .* T = 4'):
        conn.execute("SELECT llm_softmax_causal(%s, 4)", (s,))
    with raises(psycopg.errors.RaiseException, match=r"softmax_causal: a causal softmax needs p_seq_len"):
        conn.execute("SELECT llm_softmax_causal(%s, NULL)", (s,))
    with raises(psycopg.errors.RaiseException, match=r"softmax_causal: input s \(tensor id 999999\) does not exist"):
        conn.execute("SELECT llm_softmax_causal(999999, 5)")
    with raises(psycopg.errors.RaiseException, match=r'softmax_causal: output tensor "o" has shape \(10, 4\)'):
        conn.execute("SELECT llm_softmax_causal(%s, 5, 1.0, %s)", (s, wrong))
    with raises(psycopg.errors.RaiseException,
                match=r'softmax_causal_backward: dp "dp" has shape \(10, 5\) tile \{4,2\}, expected shape '
                      r'\(10, 5\) tile \{4,4\} like p "scores"'):
        conn.execute("SELECT llm_softmax_causal_backward(%s, %s)", (s, dp_tiled))
    with raises(psycopg.errors.RaiseException, match=r"softmax_causal_backward: input dp \(tensor id 999999\)"):
        conn.execute("SELECT llm_softmax_causal_backward(%s, 999999)", (s,))
    assert counts(conn) == before  # nothing written
