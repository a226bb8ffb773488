"""cross_entropy forward (mean NLL) and backward over tiles with a ragged vocabulary, against torch."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch
import torch.nn.functional as F

from pg_llm.kernels.cross_entropy import cross_entropy_backward_block, cross_entropy_block

from conftest import close
from helpers import call, get, put

SHAPES = [  # (rows, vocab, tile): vocabularies that are not a multiple of the tile (like 50257)
    (5, 7, (4, 4)),
    (37, 301, (16, 64)),
    (70, 301, (32, 100)),  # more than one 32-row float64 chunk per block
    (3, 1000, (256, 256)),
]


def torch_ce(logits: np.ndarray, targets: np.ndarray, scale: float = 1.0) -> tuple[float, np.ndarray]:
    t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(t, torch.tensor(targets, dtype=torch.long))
    (scale * loss).backward()
    return float(loss.detach()), t.grad.numpy()


def data(rng: np.random.Generator, rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    logits = (4 * rng.standard_normal((rows, vocab))).astype(np.float32)
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[0] = vocab - 1  # the last column lives in the ragged edge tile
    return logits, targets


def test_microkernels_in_numpy(rng: np.random.Generator) -> None:
    logits, targets = data(rng, 40, 11)
    loss, grad = torch_ce(logits, targets)
    tiles = [np.ascontiguousarray(logits[:, i:i + 4]).tobytes() for i in range(0, 11, 4)]
    assert cross_entropy_block(tiles, targets.tolist(), 40, 11) / 40 == pytest.approx(loss, rel=1e-12)
    out = cross_entropy_backward_block(tiles, targets.tolist(), 40, 11, 1 / 40)
    close(np.hstack([np.frombuffer(t, "<f4").reshape(40, -1) for t in out]), grad)


@pytest.mark.parametrize("rows,vocab,tile", SHAPES)
def test_forward_backward(conn: psycopg.Connection, rng: np.random.Generator, rows: int, vocab: int,
                          tile: tuple[int, int]) -> None:
    logits, targets = data(rng, rows, vocab)
    loss, grad = torch_ce(logits, targets)
    il = put(conn, logits, tile)
    got = call(conn, "SELECT llm_cross_entropy(%s, %s)", il, targets.tolist())
    assert got == pytest.approx(loss, rel=1e-10, abs=1e-10)  # float64 inside the microkernel
    ig = call(conn, "SELECT llm_cross_entropy_backward(%s, %s)", il, targets.tolist())
    close(get(conn, ig), grad)
    shape, tile_out = conn.execute("SELECT shape, tile FROM llm_tensor WHERE id = %s", (ig,)).fetchone()
    assert shape == [rows, vocab] and tile_out == [min(tile[0], rows), min(tile[1], vocab)]


def test_backward_scale_and_accumulate(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    logits, targets = data(rng, 9, 301)
    _, grad = torch_ce(logits, targets, scale=0.25)
    il = put(conn, logits, (4, 64))
    ig = call(conn, "SELECT llm_cross_entropy_backward(%s, %s, p_scale => 0.25)", il, targets.tolist())
    close(get(conn, ig), grad)
    call(conn, "SELECT llm_cross_entropy_backward(%s, %s, %s, 0.25, TRUE)", il, targets.tolist(), ig)
    close(get(conn, ig), 2 * grad)


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    return conn.execute("SELECT (SELECT count(*) FROM llm_tile), (SELECT count(*) FROM llm_tensor)").fetchone()


def test_errors(conn: psycopg.Connection) -> None:
    il = put(conn, np.zeros((4, 10)), (3, 4), name="logits")
    wrong = call(conn, "SELECT llm_tensor_create('o', ARRAY[4, 9])")
    before = counts(conn)
    raises = pytest.raises
    ok = [0, 1, 9, 2]
    for fn in ("llm_cross_entropy", "llm_cross_entropy_backward"):
        op = fn[4:]
        with raises(psycopg.errors.RaiseException,
                    match=rf'{op}: target 10 of row 2 is out of range \[0, 10\) for logits "logits" \(4, 10\)'):
            conn.execute(f"SELECT {fn}(%s, %s)", (il, [0, 1, 10, 2]))
        with raises(psycopg.errors.RaiseException, match=rf"{op}: target -1 of row 0 is out of range"):
            conn.execute(f"SELECT {fn}(%s, %s)", (il, [-1, 1, 1, 2]))
        with raises(psycopg.errors.RaiseException, match=rf"{op}: target NULL of row 3 is out of range"):
            conn.execute(f"SELECT {fn}(%s, %s)", (il, [0, 1, 1, None]))
        with raises(psycopg.errors.RaiseException,
                    match=rf'{op}: targets must be an int\[\] of 4 ids \(one per row of logits "logits" \(4, 10\)\), '
                          r"got 3 ids"):
            conn.execute(f"SELECT {fn}(%s, %s)", (il, [0, 1, 2]))
        with raises(psycopg.errors.RaiseException, match=rf"{op}: input logits \(tensor id 999999\) does not exist"):
            conn.execute(f"SELECT {fn}(999999, %s)", (ok,))
    with raises(psycopg.errors.RaiseException, match=r'cross_entropy_backward: output tensor "o" has shape \(4, 9\)'):
        conn.execute("SELECT llm_cross_entropy_backward(%s, %s, %s)", (il, ok, wrong))
    assert counts(conn) == before  # nothing written
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 1", (il,))
    with raises(psycopg.errors.RaiseException, match=r'cross_entropy: logits "logits" \(4, 10\) has 1 of 2 tile rows'):
        conn.execute("SELECT llm_cross_entropy(%s, %s)", (il, ok))
