"""Tiled storage: round trips (ragged tiles), plain-SQL inspection, validation and clear errors."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest

from pg_llm.loader.tensors import iter_tiles, read_tensor, write_tensor

from conftest import Server
from helpers import call, get, param, put


@pytest.mark.parametrize("shape,tile", [((50, 37), (16, 16)), ((301,), (1, 64)), ((5, 3), (256, 256)),
                                        ((513, 257), (256, 256)), ((7, 9), (7, 9))])
def test_round_trip_is_bit_exact(conn: psycopg.Connection, rng: np.random.Generator, shape: tuple[int, ...],
                                 tile: tuple[int, int]) -> None:
    a = rng.standard_normal(shape).astype(np.float32)
    tid = put(conn, a, tile)
    back = get(conn, tid)
    assert back.shape == a.shape and back.dtype == np.float32
    assert back.tobytes() == a.tobytes()
    rows = 1 if len(shape) == 1 else shape[0]
    want_tiles = -(-rows // min(tile[0], rows)) * -(-shape[-1] // min(tile[1], shape[-1]))
    assert call(conn, "SELECT count(*) FROM llm_tile WHERE tensor_id = %s", tid) == want_tiles
    assert call(conn, "SELECT (llm_tensor_validate(%s)).id", tid) == tid


def test_ragged_edge_tiles_have_no_padding(conn: psycopg.Connection) -> None:
    a = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    tid = put(conn, a, (4, 4))
    sizes = dict(((r, c), n) for r, c, n in conn.execute(
        "SELECT tr, tc, length(data) FROM llm_tile WHERE tensor_id = %s", (tid,)))
    assert sizes == {(0, 0): 4 * 16, (0, 1): 4 * 12, (1, 0): 4 * 4, (1, 1): 4 * 3}


def test_tile_values_as_float4(conn: psycopg.Connection) -> None:
    a = np.arange(5 * 7, dtype=np.float32).reshape(5, 7) / 4
    tid = put(conn, a, (4, 4))
    assert call(conn, "SELECT llm_tile_values(%s, 1, 1)", tid) == a[4:, 4:].ravel().tolist()
    assert call(conn, "SELECT llm_tile_values_2d(%s, 0, 1)", tid) == a[:4, 4:].tolist()
    assert call(conn, "SELECT llm_internal.llm_float4_to_tile(ARRAY[1.5, -2]::float4[])") == \
        np.array([1.5, -2], "<f4").tobytes()
    with pytest.raises(psycopg.errors.RaiseException, match=r"has no tile \(2, 0\)"):
        conn.execute("SELECT llm_tile_values(%s, 2, 0)", (tid,))


def test_tensor_rows_slice(conn: psycopg.Connection) -> None:
    a = np.arange(9 * 6, dtype=np.float32).reshape(9, 6)
    tid = put(conn, a, (4, 4))
    rows = conn.execute("SELECT row_index, vals FROM llm_tensor_rows(%s, 3, 4)", (tid,)).fetchall()
    assert [r for r, _ in rows] == [3, 4, 5, 6]
    assert [v for _, v in rows] == a[3:7].tolist()
    assert len(conn.execute("SELECT * FROM llm_tensor_rows(%s)", (tid,)).fetchall()) == 9
    for first, n in ((-1, 5), (0, -1), (None, 2)):  # used to return rows 0-4 for (-1, 5)
        with pytest.raises(psycopg.errors.RaiseException, match="must be >= 0") as e:
            conn.execute("SELECT * FROM llm_tensor_rows(%s, %s, %s)", (tid, first, n))
        assert "rows 0 to 8" in e.value.diag.message_hint


def test_tensor_drop_refuses_what_it_would_break(conn: psycopg.Connection, tmp_path) -> None:
    from gpt2_fixtures import import_tiny

    with pytest.raises(psycopg.errors.RaiseException, match="tensor id 999999 does not exist"):
        conn.execute("SELECT llm_tensor_drop(999999)")  # used to return nothing, silently
    import_tiny(conn, tmp_path, "dropme")
    wte = conn.execute("SELECT llm_tensor('dropme', 'wte.weight')").fetchone()[0]
    with pytest.raises(psycopg.errors.RaiseException, match='is a parameter of model "dropme"') as e:
        conn.execute("SELECT llm_tensor_drop(%s)", (wte,))
    assert "llm_model_drop('dropme')" in e.value.diag.message_hint
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id = %s", (wte,)).fetchone()[0] == 1
    free = put(conn, np.ones((2, 3)), name="free")
    conn.execute("SELECT llm_tensor_drop(%s)", (free,))
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id = %s", (free,)).fetchone()[0] == 0


def test_tensors_view_stats(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    a = rng.standard_normal((33, 20)).astype(np.float32)
    tid = param(conn, a, "stats.me", "m_stats", (16, 16))
    row = conn.execute("SELECT name, role, shape, tile, tiles, bytes, min, max, mean, l2_norm, nans "
                       "FROM llm_tensors WHERE id = %s", (tid,)).fetchone()
    name, role, shape, tile, tiles, nbytes, mn, mx, mean, l2, nans = row
    assert (name, role, shape, tile, tiles, nbytes, nans) == ("stats.me", "param", [33, 20], [16, 16], 6,
                                                              a.nbytes, 0)
    a64 = a.astype(np.float64)
    assert mn == pytest.approx(a64.min()) and mx == pytest.approx(a64.max())
    assert mean == pytest.approx(a64.mean()) and l2 == pytest.approx(np.sqrt((a64 ** 2).sum()))
    assert call(conn, "SELECT llm_tensor('m_stats', 'stats.me')") == tid


def test_durable_and_scratch_partitions(conn: psycopg.Connection) -> None:
    p = param(conn, np.ones((2, 2)), "w", "m_part")
    s = put(conn, np.ones((2, 2)))
    assert p > 0 > s
    assert call(conn, "SELECT count(*) FROM llm_tile_durable WHERE tensor_id = %s", p) == 1
    assert call(conn, "SELECT count(*) FROM llm_tile_scratch WHERE tensor_id = %s", s) == 1
    assert call(conn, "SELECT relpersistence FROM pg_class WHERE relname = 'llm_tile_scratch'") == "u"
    assert call(conn, "SELECT relpersistence FROM pg_class WHERE relname = 'llm_tile_durable'") == "p"
    assert call(conn, "SELECT attstorage FROM pg_attribute WHERE attrelid = 'llm_tile_durable'::regclass "
                      "AND attname = 'data'") == "e"
    assert call(conn, "SELECT llm_scratch_clear()") >= 1
    assert call(conn, "SELECT count(*) FROM llm_tensor WHERE id < 0") == 0
    assert call(conn, "SELECT count(*) FROM llm_tile WHERE tensor_id = %s", p) == 1


def test_missing_tensor_errors(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match=r'tensor "nope" \(role param\) of model "m" does not'):
        conn.execute("SELECT llm_tensor('m', 'nope')")
    with pytest.raises(psycopg.errors.RaiseException, match="tensor id 123456789 does not exist"):
        conn.execute("SELECT llm_tile_values(123456789, 0, 0)")
    with pytest.raises(psycopg.errors.RaiseException, match="needs a 1-D or 2-D shape"):
        conn.execute("SELECT llm_tensor_create('bad', ARRAY[2, 0])")


def test_validate_catches_bad_payload_and_missing_tiles(conn: psycopg.Connection) -> None:
    tid = put(conn, np.ones((5, 5)), (4, 4))
    conn.execute("UPDATE llm_tile SET data = substring(data from 5) WHERE tensor_id = %s AND tr = 1 AND tc = 1",
                 (tid,))
    with pytest.raises(psycopg.errors.RaiseException, match=r"tile \(1, 1\) has a payload whose length"):
        conn.execute("SELECT llm_tensor_validate(%s)", (tid,))
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 1 AND tc = 1", (tid,))
    with pytest.raises(psycopg.errors.RaiseException, match=r"has 3 tiles, expected 4"):
        conn.execute("SELECT llm_tensor_validate(%s)", (tid,))
    with pytest.raises(ValueError, match="has 3 tiles, expected 4"):
        read_tensor(conn, tid)


def test_loader_rejects_nan_and_bad_rank_writing_nothing(conn: psycopg.Connection) -> None:
    before = call(conn, "SELECT count(*) FROM llm_tensor")
    with pytest.raises(ValueError, match="NaN/Inf"):
        write_tensor(conn, np.array([[1.0, np.nan]]), "nan")
    with pytest.raises(ValueError, match="1-D or 2-D"):
        write_tensor(conn, np.ones((2, 2, 2)), "cube")
    assert call(conn, "SELECT count(*) FROM llm_tensor") == before


def test_iter_tiles_cover_everything_once() -> None:
    a = np.arange(11 * 13, dtype=np.float32).reshape(11, 13)
    seen = np.zeros_like(a)
    for tr, tc, data in iter_tiles(a, (4, 5)):
        block = np.frombuffer(data, "<f4").reshape(min(4, 11 - 4 * tr), -1)
        seen[4 * tr:4 * tr + block.shape[0], 5 * tc:5 * tc + block.shape[1]] += block
    assert (seen == a).all()


def test_a_fresh_database_gets_statistics_once(server: Server) -> None:
    """llm_tables_analyze: ANALYZE the tensor/tile/dataset tables that never were, then nothing."""
    stats = ("SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname IN "
             "('llm_tensor', 'llm_tile_durable', 'llm_tile_scratch', 'llm_dataset') ORDER BY relname")
    with psycopg.connect(server.fresh_db("t_storage_fresh"), autocommit=True) as c:
        assert [a for _, a in c.execute(stats).fetchall()] == [False] * 4
        assert c.execute("SELECT llm_internal.llm_tables_analyze()").fetchone()[0] == 4
        assert c.execute(stats).fetchall() == [("llm_dataset", True), ("llm_tensor", True),
                                               ("llm_tile_durable", True), ("llm_tile_scratch", True)]
        assert c.execute("SELECT llm_internal.llm_tables_analyze()").fetchone()[0] == 0
