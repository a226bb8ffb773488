"""embedding row gather and scatter-add backward over tiles, against torch.nn.functional.embedding autograd."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch
import torch.nn.functional as F

from pg_llm.kernels.embedding import embedding_scatter_tile

from conftest import close
from helpers import call, get, put

SHAPES = [  # (vocab, cols, n ids, weight tile, out tile rows): ragged everywhere
    (7, 5, 6, (4, 4), 4),
    (301, 48, 37, (64, 16), 16),
    (50, 33, 10, (50, 256), None),
    (13, 9, 40, (5, 4), 7),  # more ids than rows: many repeats
]


def torch_embedding(w: np.ndarray, ids: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tw = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    out = F.embedding(torch.tensor(ids, dtype=torch.long), tw)
    out.backward(torch.tensor(dy, dtype=torch.float64))
    return out.detach().numpy(), tw.grad.numpy()


def test_microkernel_in_numpy(rng: np.random.Generator) -> None:
    dy = rng.standard_normal((4, 3), dtype=np.float32)
    out = np.frombuffer(embedding_scatter_tile(dy.tobytes(), [2, 0, 2, 4], 5, 3), "<f4").reshape(5, 3)
    want = np.zeros((5, 3))
    want[2] = dy[0] + dy[2]
    want[0] = dy[1]
    want[4] = dy[3]
    close(out, want)
    assert embedding_scatter_tile(b"", [], 2, 3) == bytes(24)


@pytest.mark.parametrize("vocab,cols,n,tile,out_rows", SHAPES)
def test_forward_backward(conn: psycopg.Connection, rng: np.random.Generator, vocab: int, cols: int, n: int,
                          tile: tuple[int, int], out_rows: int | None) -> None:
    w = rng.standard_normal((vocab, cols), dtype=np.float32)
    ids = rng.integers(0, vocab, n).astype(np.int32)
    ids[:3] = [vocab - 1, 0, vocab - 1]  # the ragged edge tile row, and a repeat
    dy = rng.standard_normal((n, cols), dtype=np.float32)
    out_want, dw_want = torch_embedding(w, ids, dy)
    iw = put(conn, w, tile)
    out = call(conn, "SELECT llm_embedding(%s, %s, NULL, %s)", iw, ids.tolist(), out_rows)
    close(get(conn, out), out_want)
    shape, tile_out = conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (out,)).fetchone()
    assert shape == [n, cols] and tile_out == [min(out_rows or 256, n), min(tile[1], cols)]
    # backward into a complete gradient (accumulate = FALSE writes zero tiles where no id lands)
    dw = call(conn, "SELECT llm_tensor_create(%s, %s, %s, 'grad')", f"dw{vocab}x{n}", [vocab, cols],
              [min(tile[0], vocab), min(tile[1], cols)])
    idy = put(conn, dy, (3, tile[1]))  # dy's tile rows need not match anything
    assert call(conn, "SELECT llm_embedding_backward(%s, %s, %s, FALSE)", idy, ids.tolist(), dw) == dw
    close(get(conn, dw), dw_want)
    # accumulate (the default): a second backward adds the same gradient again
    call(conn, "SELECT llm_embedding_backward(%s, %s, %s)", idy, ids.tolist(), dw)
    close(get(conn, dw), 2 * dw_want)


def test_accumulate_touches_only_landed_tiles(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    w_grad = rng.standard_normal((20, 6), dtype=np.float32)
    dw = put(conn, w_grad, (4, 4), name="dw")
    dy = rng.standard_normal((3, 6), dtype=np.float32)
    ids = np.array([5, 6, 5], dtype=np.int32)  # all in tile row 1
    before = dict(conn.execute("SELECT (tr, tc)::TEXT, xmin::TEXT FROM llm_tile WHERE tensor_id = %s", (dw,)))
    call(conn, "SELECT llm_embedding_backward(%s, %s, %s)", put(conn, dy, (2, 4)), ids.tolist(), dw)
    after = dict(conn.execute("SELECT (tr, tc)::TEXT, xmin::TEXT FROM llm_tile WHERE tensor_id = %s", (dw,)))
    changed = sorted(k for k in after if after[k] != before[k])
    assert changed == ["(1,0)", "(1,1)"]
    close(get(conn, dw), w_grad + torch_embedding(w_grad, ids, dy)[1])


def test_token_plus_position(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """x = wte[tokens] + wpe[positions] for a batch of 2 sequences of T = 5, as (B*T, C) rows."""
    wte = rng.standard_normal((101, 12), dtype=np.float32)
    wpe = rng.standard_normal((8, 12), dtype=np.float32)
    tokens = rng.integers(0, 101, 10).astype(np.int32)
    positions = [i % 5 for i in range(10)]
    x = call(conn, "SELECT llm_embedding(%s, %s, NULL, 4)", put(conn, wte, (16, 8)), tokens.tolist())
    call(conn, "SELECT llm_embedding(%s, %s, %s, 4, TRUE)", put(conn, wpe, (3, 8)), positions, x)
    close(get(conn, x), wte[tokens].astype(np.float64) + wpe[positions])


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    return conn.execute("SELECT (SELECT count(*) FROM llm_tile), (SELECT count(*) FROM llm_tensor)").fetchone()


def test_errors(conn: psycopg.Connection) -> None:
    w = put(conn, np.ones((10, 6)), (4, 4), name="wte")
    dy = put(conn, np.ones((3, 6)), (2, 4), name="dy")
    dy_tiled = put(conn, np.ones((3, 6)), (2, 3), name="dy3")
    dw = put(conn, np.zeros((10, 6)), (4, 4), name="dw")
    dw_wrong = call(conn, "SELECT llm_tensor_create('o', ARRAY[3, 5])")
    before = counts(conn)
    raises = pytest.raises
    with raises(psycopg.errors.RaiseException,
                match=r'embedding: id 10 at position 1 is out of range \[0, 10\) for weight "wte" \(10, 6\)'):
        conn.execute("SELECT llm_embedding(%s, %s)", (w, [0, 10]))
    with raises(psycopg.errors.RaiseException, match=r"embedding: id -3 at position 0 is out of range"):
        conn.execute("SELECT llm_embedding(%s, %s)", (w, [-3]))
    with raises(psycopg.errors.RaiseException, match=r"embedding: id NULL at position 2 is out of range"):
        conn.execute("SELECT llm_embedding(%s, %s)", (w, [1, 2, None]))
    with raises(psycopg.errors.RaiseException, match=r"embedding: ids must be a non-empty int\[\]"):
        conn.execute("SELECT llm_embedding(%s, '{}'::INT[])", (w,))
    with raises(psycopg.errors.RaiseException, match=r"embedding: input weight \(tensor id 999999\) does not exist"):
        conn.execute("SELECT llm_embedding(999999, %s)", ([1],))
    with raises(psycopg.errors.RaiseException, match=r"embedding: p_out_tile_rows must be positive"):
        conn.execute("SELECT llm_embedding(%s, %s, NULL, 0)", (w, [1]))
    with raises(psycopg.errors.RaiseException, match=r'embedding: output tensor "o" has shape \(3, 5\)'):
        conn.execute("SELECT llm_embedding(%s, %s, %s)", (w, [1, 2, 3], dw_wrong))
    with raises(psycopg.errors.RaiseException,
                match=r'embedding_backward: ids must be an int\[\] of 3 ids \(one per row of dy "dy"\), got 2'):
        conn.execute("SELECT llm_embedding_backward(%s, %s, %s)", (dy, [1, 2], dw))
    with raises(psycopg.errors.RaiseException,
                match=r'embedding_backward: id 11 at position 2 is out of range \[0, 10\) for weight "dw"'):
        conn.execute("SELECT llm_embedding_backward(%s, %s, %s)", (dy, [1, 2, 11], dw))
    with raises(psycopg.errors.RaiseException,
                match=r'embedding_backward: dy "dy3" has shape \(3, 6\) tile \{2,3\}, expected \(N, 6\) cut like '
                      r'dweight "dw" \(10, 6\) \(tile cols 4\)'):
        conn.execute("SELECT llm_embedding_backward(%s, %s, %s, FALSE)", (dy_tiled, [1, 2, 3], dw))
    with raises(psycopg.errors.RaiseException, match=r'embedding_backward: dy "dy" has shape \(3, 6\) .* "o"'):
        conn.execute("SELECT llm_embedding_backward(%s, %s, %s, FALSE)", (dy, [1, 2, 3], dw_wrong))
    with raises(psycopg.errors.RaiseException, match=r"embedding_backward: input dweight \(tensor id 999999\)"):
        conn.execute("SELECT llm_embedding_backward(%s, %s, 999999)", (dy, [1, 2, 3]))
    assert counts(conn) == before  # nothing written
