"""Seeded inverted dropout: the mask is PCG64(SeedSequence([seed, tr, tc])) per tile, reproducible across sessions,
kept at rate 1 - rate, scaled by 1 / (1 - rate), shared by forward and backward; errors write nothing."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest

from pg_llm.kernels.dropout import dropout_tile

from conftest import close
from helpers import call, get, put, refused


def reference(x: np.ndarray, tile: tuple[int, int], rate: float, seed: int) -> np.ndarray:
    """x * mask / (1 - rate) with each tile's mask from numpy's Generator.random() (independently of the kernel)."""
    m = x.reshape(1, -1) if x.ndim == 1 else x
    out = np.zeros_like(m, dtype=np.float64)
    th, tw = tile
    for r0 in range(0, m.shape[0], th):
        for c0 in range(0, m.shape[1], tw):
            block = m[r0:r0 + th, c0:c0 + tw]
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % 2**64, r0 // th, c0 // tw])))
            keep = rng.random(block.shape) >= rate
            out[r0:r0 + th, c0:c0 + tw] = np.where(keep, block / (1 - rate), 0)
    return out.reshape(x.shape)


def test_microkernel_in_numpy(rng: np.random.Generator) -> None:
    x = rng.standard_normal((6, 5)).astype(np.float32)
    for seed in (0, 7, -3, 2**63 - 1):
        y = np.frombuffer(dropout_tile(x.tobytes(), 0.3, seed, 2, 5), "<f4").reshape(6, 5)
        full = np.zeros((18, 30), np.float32)
        full[12:18, 25:30] = x  # tile (2, 5) of a (6, 5)-tiled tensor
        close(y, reference(full, (6, 5), 0.3, seed)[12:18, 25:30])
        assert y.dtype == np.float32


@pytest.mark.parametrize("shape,tile", [((37, 50), (16, 16)), ((21,), (1, 8)), ((3, 300), (256, 256))])
def test_forward_matches_reference(conn: psycopg.Connection, rng: np.random.Generator, shape: tuple[int, ...],
                                   tile: tuple[int, int]) -> None:
    x = rng.standard_normal(shape).astype(np.float32)
    ix = put(conn, x, tile)
    y = get(conn, call(conn, "SELECT llm_dropout(%s, 0.25, 1234)", ix))
    close(y, reference(x, tile, 0.25, 1234))
    assert y.shape == shape


def test_reproducible_across_sessions(conn: psycopg.Connection, dsn: str, rng: np.random.Generator) -> None:
    x = rng.standard_normal((37, 50)).astype(np.float32)
    ix = put(conn, x, (16, 16))
    a = get(conn, call(conn, "SELECT llm_dropout(%s, 0.5, 42)", ix))
    b = get(conn, call(conn, "SELECT llm_dropout(%s, 0.5, 42)", ix))
    assert np.array_equal(a, b)
    with psycopg.connect(dsn, autocommit=True) as other:  # another backend: same mask from the same seed
        c = get(other, call(other, "SELECT llm_dropout(%s, 0.5, 42)", ix))
    assert np.array_equal(a, c)
    d = get(conn, call(conn, "SELECT llm_dropout(%s, 0.5, 43)", ix))
    assert not np.array_equal(a == 0, d == 0), "different seeds give different masks"
    e = get(conn, call(conn, "SELECT llm_dropout(%s, 0.5, -42)", ix))
    assert not np.array_equal(a == 0, e == 0)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_kept_fraction_and_scale(conn: psycopg.Connection, rate: float) -> None:
    shape = (300, 334)  # 100200 elements in ragged 64 x 64 tiles
    ix = put(conn, np.ones(shape), (64, 64))
    y = get(conn, call(conn, "SELECT llm_dropout(%s, %s, 7)", ix, rate))
    n = y.size
    kept = int((y != 0).sum())
    sigma = np.sqrt(n * rate * (1 - rate))
    assert abs(kept - n * (1 - rate)) < 4 * sigma, f"kept {kept} of {n} at rate {rate}"
    close(y[y != 0], np.full(kept, 1 / (1 - rate)))  # kept values scaled by 1 / (1 - rate)
    # the mask is not the same in every tile
    assert not np.array_equal(y[:64, :64] == 0, y[64:128, :64] == 0)


def test_backward_uses_the_same_mask(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    x, dy = (rng.standard_normal((37, 50)).astype(np.float32) for _ in range(2))
    ix, idy = put(conn, x, (16, 16)), put(conn, dy, (16, 16))
    rate, seed = 0.3, 99
    mask = get(conn, call(conn, "SELECT llm_dropout(%s, %s, %s)", put(conn, np.ones((37, 50)), (16, 16)), rate, seed))
    assert set(np.unique(mask)) <= {0.0, np.float32(1 / (1 - rate))}
    y = get(conn, call(conn, "SELECT llm_dropout(%s, %s, %s)", ix, rate, seed))
    close(y, x.astype(np.float64) * mask)  # y = x * mask / (1 - rate)
    dx = call(conn, "SELECT llm_dropout_backward(%s, %s, %s)", idy, rate, seed)  # NULL dx allocates
    close(get(conn, dx), dy.astype(np.float64) * mask)  # dy/dx = mask / (1 - rate)
    assert call(conn, "SELECT llm_dropout_backward(%s, %s, %s, %s)", idy, rate, seed, dx) == dx  # accumulates
    close(get(conn, dx), 2 * dy.astype(np.float64) * mask)
    call(conn, "SELECT llm_dropout_backward(%s, %s, %s, %s, FALSE)", idy, rate, seed, dx)  # overwrites
    close(get(conn, dx), dy.astype(np.float64) * mask)


def test_rate_zero_is_identity(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    x = rng.standard_normal((5, 7)).astype(np.float32)
    ix = put(conn, x, (4, 4))
    assert np.array_equal(get(conn, call(conn, "SELECT llm_dropout(%s, 0, 5)", ix)), x)
    assert np.array_equal(get(conn, call(conn, "SELECT llm_dropout(%s, 0, NULL)", ix)), x)  # no seed needed
    assert np.array_equal(get(conn, call(conn, "SELECT llm_dropout_backward(%s, 0, NULL)", ix)), x)


def test_errors(conn: psycopg.Connection) -> None:
    x = put(conn, np.ones((5, 7)), (4, 4), name="x")
    for rate in (1.0, -0.1, 1.5, float("nan")):
        refused(conn, r'pg_llm: dropout: rate must be in \[0, 1\), got .* \(dropping "x"\)',
                "SELECT llm_dropout(%s, %s, 1)", x, rate)
    refused(conn, r"pg_llm: dropout: rate must be in \[0, 1\), got <NULL>", "SELECT llm_dropout(%s, NULL, 1)", x)
    refused(conn, r"pg_llm: dropout_backward: rate must be in \[0, 1\), got 1", "SELECT llm_dropout_backward(%s, 1, 1)",
            x)
    refused(conn, r'pg_llm: dropout: seed is NULL \(dropping "x" at rate 0.5\)', "SELECT llm_dropout(%s, 0.5, NULL)", x)
    refused(conn, r"pg_llm: dropout: input x \(tensor id 999999\) does not exist", "SELECT llm_dropout(999999, 0.5, 1)")
    refused(conn, "pg_llm: dropout: output tensor id .* is also an input", "SELECT llm_dropout(%s, 0.5, 1, %s)", x, x)
    wrong = call(conn, "SELECT llm_tensor_create('o', ARRAY[3, 3])")
    refused(conn, r'pg_llm: dropout_backward: output tensor "o" has shape \(3, 3\)',
            "SELECT llm_dropout_backward(%s, 0.5, 1, %s)", x, wrong)


@pytest.mark.parametrize("n, th", [(23, 5), (300, 256), (40, 256)])
def test_rows_of_a_matrix_get_its_masks(n: int, th: int) -> None:
    """dropout_rows of rows lo.. of a matrix, told their first row, equals those rows of the whole matrix's
    dropout (any cut, edge tiles included); and a matrix of at most th rows has its single tile's masks."""
    from pg_llm.kernels.dropout import dropout_rows
    a = np.random.default_rng(n).standard_normal((n, 13)).astype(np.float32)
    full = dropout_rows(a, 0.4, 9, th, 6)
    for lo, hi in [(0, n), (1, n), (th - 1, min(n, th + 3)), (n - 1, n), (n // 3, 2 * n // 3)]:
        assert np.array_equal(dropout_rows(a[lo:hi], 0.4, 9, th, 6, lo), full[lo:hi]), (lo, hi)
    if n <= th:
        assert np.array_equal(dropout_rows(a, 0.4, 9, n, 6), full)
