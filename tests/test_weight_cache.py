"""The per-backend weight cache of llm_mk_matmul_panel (py/ops/weight_cache.py): hits on repeated calls, results
identical with the cache on and off, and never a stale block: updates in the same transaction, in another
session, rolled back (transaction and savepoint, also after VACUUM frees the slot), AdamW steps, VACUUM FULL;
budget 0 disables it, a tiny budget evicts least recently used blocks."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from pg_llm.kernels.weight_cache import cache_evict, cached_block, weight_cache

import helpers
from helpers import call, get, put

W_SHAPE, W_TILE = (24, 20), (8, 8)  # ragged: 3 x 3 tiles


# ---- the cache logic without a server ----------------------------------------------------------------------

class FakePlpy:
    """Serves the fingerprint and load queries from a dict {(tr, tc): (version, payload)}."""

    def __init__(self, tiles: dict[tuple[int, int], tuple[int, bytes]]) -> None:
        self.tiles, self.loads = tiles, 0

    def prepare(self, sql: str, types: list[str]) -> str:
        return sql

    def execute(self, plan: str, args: list[int]) -> list[dict[str, object]]:
        rows = [{"fp": f"{tr}:{tc}:{v}", "data": d} for (tr, tc), (v, d) in sorted(self.tiles.items())]
        if "string_agg" in plan:
            return [{"fp": " ".join(r["fp"] for r in rows) or None}]
        self.loads += 1
        return rows


def test_cached_block_logic() -> None:
    plpy, gd = FakePlpy({(0, 0): (1, b"\0" * 8)}), {}

    def build(tiles: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(tiles), "<f4").copy()
    get_block = lambda tid: cached_block(plpy, gd, tid, [1, 2, 1, 2], [0, 1, 0, 1], build, 20)  # noqa: E731
    a = get_block(7)
    assert get_block(7) is a and plpy.loads == 1 and not a.flags.writeable
    plpy.tiles[(0, 0)] = (2, np.float32([1, 2]).tobytes())  # a new row version
    b = get_block(7)
    assert b is not a and b.tolist() == [1, 2] and plpy.loads == 2
    c = weight_cache(gd)
    assert (c["hits"], c["misses"], c["bytes"], len(c["lru"])) == (1, 2, 8, 1)
    get_block(8)
    get_block(9)  # 24 bytes > 20: the least recently used (7) goes
    assert list(k[0] for k in c["lru"]) == [8, 9] and c["evictions"] == 1 and c["bytes"] == 16
    cache_evict(c, 0)
    assert c["lru"] == OrderedDict() and c["bytes"] == 0


# ---- in the server -------------------------------------------------------------------------------------------

@pytest.fixture
def cache(conn: psycopg.Connection) -> Iterator[None]:
    conn.execute("SELECT llm_weight_cache_clear()")
    yield
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', '', FALSE)")
    conn.execute("SELECT set_config('pg_llm.matmul_panel_floats', '', FALSE)")


def stats(conn: psycopg.Connection) -> dict[str, int]:
    cur = conn.execute("SELECT * FROM llm_weight_cache_stats()")
    return dict(zip([d.name for d in cur.description], cur.fetchone(), strict=True))


def param(conn: psycopg.Connection, arr: np.ndarray, name: str) -> int:
    return helpers.param(conn, arr, name, "wc", W_TILE, replace=True)


def matmul(conn: psycopg.Connection, x: int, w: int, tb: bool = False) -> np.ndarray:
    out = call(conn, "SELECT llm_matmul(%s, %s, p_tb => %s)", x, w, tb)
    y = get(conn, out)
    conn.execute("SELECT llm_tensor_drop(%s)", (out,))
    return y


def set_tile(conn: psycopg.Connection, w: int, value: float) -> None:
    conn.execute("UPDATE llm_tile SET data = %s WHERE tensor_id = %s AND tr = 1 AND tc = 1",
                 (np.full(W_TILE, value, np.float32).tobytes(), w))


def expected(x: np.ndarray, w: np.ndarray, value: float | None = None) -> np.ndarray:
    w = w.copy()
    if value is not None:
        w[8:16, 8:16] = value
    return x.astype(np.float64) @ w.astype(np.float64)


def test_hits_and_identical_results(conn: psycopg.Connection, rng: np.random.Generator, cache: None) -> None:
    x_arr = rng.standard_normal((5, W_SHAPE[0]), dtype=np.float32)
    w_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    x, w = put(conn, x_arr, (5, 8)), param(conn, w_arr, "w_hits")
    first = matmul(conn, x, w)
    s = stats(conn)
    assert (s["tensors"], s["entries"], s["hits"], s["misses"]) == (1, 1, 0, 1)
    assert s["bytes"] == w_arr.nbytes
    again = matmul(conn, x, w)
    assert stats(conn)["hits"] == 1 and stats(conn)["misses"] == 1
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', '0', FALSE)")
    off = matmul(conn, x, w)
    assert first.tobytes() == again.tobytes() == off.tobytes()
    assert stats(conn)["bytes"] == 0 and stats(conn)["hits"] == 1  # budget 0: freed and not consulted
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', '', FALSE)")
    # the tied-projection form (W transposed) over several panels: one entry per panel, all hit the 2nd time
    conn.execute("SELECT set_config('pg_llm.matmul_panel_floats', '200', FALSE)")
    xt = put(conn, rng.standard_normal((5, W_SHAPE[1]), dtype=np.float32), (5, 8))
    before = stats(conn)
    a, b = matmul(conn, xt, w, tb=True), matmul(conn, xt, w, tb=True)
    s = stats(conn)
    assert a.tobytes() == b.tobytes() and s["entries"] - before["entries"] == 3
    assert s["hits"] - before["hits"] == 3 and s["misses"] - before["misses"] == 3
    np.testing.assert_allclose(a, get(conn, xt).astype(np.float64) @ w_arr.T.astype(np.float64), rtol=1e-5,
                               atol=1e-5)


def test_update_in_same_transaction_and_rollback(conn: psycopg.Connection, rng: np.random.Generator,
                                                 cache: None) -> None:
    x_arr = rng.standard_normal((3, W_SHAPE[0]), dtype=np.float32)
    w_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    x, w = put(conn, x_arr, (3, 8)), param(conn, w_arr, "w_tx")
    np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr), atol=1e-4)
    with conn.transaction():
        np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr), atol=1e-4)  # a hit
        set_tile(conn, w, 2.0)  # a new row version of this transaction
        np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, 2.0), atol=1e-4)
        set_tile(conn, w, 3.0)  # again: same xmin, another ctid
        np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, 3.0), atol=1e-4)
        with conn.transaction():  # a savepoint: update, use, roll back (Rollback is swallowed)
            set_tile(conn, w, 4.0)
            np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, 4.0), atol=1e-4)
            raise psycopg.Rollback
        np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, 3.0), atol=1e-4)
        raise psycopg.Rollback  # the whole transaction: the cache holds a block of its (aborted) versions
    np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr), atol=1e-4)
    assert stats(conn)["entries"] == 1  # a stale block is replaced, not kept beside the new one


def test_rolled_back_version_slot_reused(conn: psycopg.Connection, rng: np.random.Generator, cache: None) -> None:
    """A version written, cached, rolled back and vacuumed away frees its slot; the next version may take the
    same ctid, but its xmin differs: still a miss."""
    x_arr = rng.standard_normal((2, W_SHAPE[0]), dtype=np.float32)
    w_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    x, w = put(conn, x_arr, (2, 8)), param(conn, w_arr, "w_slot")
    ctid = "SELECT ctid::TEXT FROM llm_tile WHERE tensor_id = %s AND tr = 1 AND tc = 1"
    reused = []
    for value in (5.0, 7.0, 9.0, 11.0):  # where a new version lands is the heap's choice: try until a slot is reused
        with conn.transaction():
            set_tile(conn, w, value)
            aborted = call(conn, ctid, w)
            np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, value), atol=1e-4)
            raise psycopg.Rollback
        conn.execute("VACUUM llm_tile_durable")
        set_tile(conn, w, value + 1)
        misses = stats(conn)["misses"]
        np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, value + 1), atol=1e-4)
        assert stats(conn)["misses"] == misses + 1
        reused.append(call(conn, ctid, w) == aborted)
        if reused[-1]:
            break
    assert any(reused), "the scenario needs a new version in a freed slot: none of 4 tries gave one"


def test_other_session_and_snapshots(dsn: str, conn: psycopg.Connection, rng: np.random.Generator,
                                     cache: None) -> None:
    x_arr = rng.standard_normal((4, W_SHAPE[0]), dtype=np.float32)
    w_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    x, w = put(conn, x_arr, (4, 8)), param(conn, w_arr, "w_other")
    matmul(conn, x, w)
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT llm_weight_cache_clear()")
        xo = put(other, x_arr, (4, 8))
        np.testing.assert_allclose(matmul(other, xo, w), expected(x_arr, w_arr), atol=1e-4)  # its own cache
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        try:
            np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr), atol=1e-4)
            set_tile(other, w, 7.0)  # committed by the other session
            np.testing.assert_allclose(matmul(other, xo, w), expected(x_arr, w_arr, 7.0), atol=1e-4)
            # our snapshot predates the commit: the old weights, whatever the other backend caches
            np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr), atol=1e-4)
        finally:
            conn.execute("COMMIT")
        np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, 7.0), atol=1e-4)
        set_tile(other, w, 8.0)
        np.testing.assert_allclose(matmul(conn, x, w), expected(x_arr, w_arr, 8.0), atol=1e-4)


def test_adamw_step_and_vacuum_full(conn: psycopg.Connection, rng: np.random.Generator, cache: None) -> None:
    x_arr = rng.standard_normal((3, W_SHAPE[0]), dtype=np.float32)
    w_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    x, w = put(conn, x_arr, (3, 8)), param(conn, w_arr, "w_adam")
    g = put(conn, rng.standard_normal(W_SHAPE, dtype=np.float32), W_TILE)
    matmul(conn, x, w)
    m, v = conn.execute("SELECT * FROM llm_internal.llm_adamw_state(%s)", (w,)).fetchone()
    conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, 1, 0.1)", (w, g, m, v))
    w_new = get(conn, w)
    assert not np.array_equal(w_new, w_arr)
    np.testing.assert_allclose(matmul(conn, x, w), x_arr.astype(np.float64) @ w_new, atol=1e-4)
    conn.execute("VACUUM FULL llm_tile_durable")  # moves row versions: reloaded or identical content
    np.testing.assert_allclose(matmul(conn, x, w), x_arr.astype(np.float64) @ w_new, atol=1e-4)


def test_lru_eviction_and_setting(conn: psycopg.Connection, rng: np.random.Generator, cache: None) -> None:
    x = put(conn, rng.standard_normal((2, W_SHAPE[0]), dtype=np.float32), (2, 8))
    ws = [param(conn, rng.standard_normal(W_SHAPE, dtype=np.float32), f"w_lru{i}") for i in range(3)]
    nbytes = 4 * W_SHAPE[0] * W_SHAPE[1]
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', %s, FALSE)", (str(2.5 * nbytes / 2**20),))
    want = [matmul(conn, x, w) for w in ws]  # the third evicts the first
    s = stats(conn)
    assert (s["entries"], s["evictions"], s["bytes"]) == (2, 1, 2 * nbytes)
    assert matmul(conn, x, ws[2]).tobytes() == want[2].tobytes() and stats(conn)["hits"] == 1
    assert matmul(conn, x, ws[0]).tobytes() == want[0].tobytes()  # reloaded, evicts ws[1]
    s = stats(conn)
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 4, 2)
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', %s, FALSE)", (str(0.5 * nbytes / 2**20),))
    matmul(conn, x, ws[1])  # larger than the budget: used, not kept, and the others are evicted
    assert stats(conn)["bytes"] == 0
    assert call(conn, "SELECT llm_weight_cache_clear()") == 0
    assert stats(conn) == dict(tensors=0, entries=0, bytes=0, hits=0, misses=0, evictions=0)
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', 'lots', FALSE)")
    with pytest.raises(psycopg.errors.InternalError_, match="pg_llm: pg_llm.weight_cache_mb must be"):
        matmul(conn, x, ws[0])


def test_vacuum_full_same_xmin(conn: psycopg.Connection, rng: np.random.Generator, cache: None) -> None:
    """Two versions of one tile written by one transaction share (tr, tc, xmin); VACUUM FULL drops the first and
    here puts the second at the first one's ctid, every other tile keeping its ctid. The fingerprint's
    relfilenode (new after any rewrite) keeps the block cached from the first version from being served."""
    x_arr = rng.standard_normal((2, W_SHAPE[0]), dtype=np.float32)
    w_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    conn.execute("VACUUM FULL llm_tile_durable")
    x, w = put(conn, x_arr, (2, 8)), param(conn, w_arr, "w_full")
    last = "UPDATE llm_tile SET data = %s WHERE tensor_id = %s AND tr = 2 AND tc = 2"  # the last tile: (8, 4)
    ctid = "SELECT ctid::TEXT FROM llm_tile WHERE tensor_id = %s AND tr = 2 AND tc = 2"
    want = w_arr.copy()
    with conn.transaction():
        conn.execute(last, (np.full((8, 4), 2.0, np.float32).tobytes(), w))
        first = call(conn, ctid, w)
        want[16:, 16:] = 2.0
        np.testing.assert_allclose(matmul(conn, x, w), x_arr.astype(np.float64) @ want, atol=1e-4)  # cached
        param(conn, np.ones((1, 1), np.float32), "w_full_pad")  # one live row between the two versions
        conn.execute(last, (np.full((8, 4), 3.0, np.float32).tobytes(), w))
    conn.execute("VACUUM FULL llm_tile_durable")
    assert call(conn, ctid, w) == first, "the scenario needs the second version at the first one's ctid"
    misses = stats(conn)["misses"]
    want[16:, 16:] = 3.0
    np.testing.assert_allclose(matmul(conn, x, w), x_arr.astype(np.float64) @ want, atol=1e-4)
    assert stats(conn)["misses"] == misses + 1


def test_adamw_takes_the_param_from_the_cache_and_leaves_the_new_one(conn: psycopg.Connection,
                                                                    rng: np.random.Generator, cache: None) -> None:
    """llm_adamw_step over a whole param reads it from its whole-tensor entry (the one a fused forward or the
    LM head made) and puts the new value back, fingerprinted from the versions it wrote: the next reader hits and
    computes what it computes with the cache off; parameters and moments are those of the uncached step."""
    w_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    x = put(conn, rng.standard_normal((5, W_SHAPE[1]), dtype=np.float32), (5, 8))
    g_arr = rng.standard_normal(W_SHAPE, dtype=np.float32)
    tg = rng.integers(0, W_SHAPE[0], 5).tolist()

    def run(name: str) -> tuple[list[np.ndarray], tuple]:
        w = param(conn, w_arr, name)
        m, v = conn.execute("SELECT * FROM llm_internal.llm_adamw_state(%s)", (w,)).fetchone()
        conn.execute("SELECT * FROM llm_internal.llm_head_nll(%s, %s, %s)", (x, w, tg))  # caches w whole
        before = stats(conn)
        for step in (1, 2):
            conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, %s, 0.1)", (w, put(conn, g_arr, W_TILE), m, v, step))
        after = stats(conn)
        loss = conn.execute("SELECT loss FROM llm_internal.llm_head_nll(%s, %s, %s)", (x, w, tg)).fetchone()[0]
        return [get(conn, t) for t in (w, m, v)], (before, after, stats(conn), loss)
    cached, (b, a, last, loss) = run("w_adopt")
    assert a["misses"] == b["misses"] and a["hits"] >= b["hits"] + 2  # both steps took w from the cache
    assert last["misses"] == a["misses"] and last["hits"] == a["hits"] + 1  # the new w: adopted, then hit
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', '0', FALSE)")
    plain, (_, _, _, plain_loss) = run("w_plain")
    assert all(np.array_equal(c, p) for c, p in zip(cached, plain, strict=True)) and loss == plain_loss
