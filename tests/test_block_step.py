"""Fused decoding (ops/block_step.py): llm_mk_gpt2_block_step against a float64 numpy block, and
llm_gpt2_forward_cached's one-token path against the kernel chain (pg_llm.fused_decode = off), bit for bit,
with the weight cache on and off, after a weight update, and after a rolled-back step (the KV mirror must not
reuse the aborted row)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from pg_llm.kernels.block_step import block_shapes, gpt2_block_step

from gpt2_fixtures import import_tiny

MODEL, C, H = "bs_tiny", 48, 3


def ref_block(x, w, kv, n_head, eps):
    """A GPT-2 block for one new row in float64 (GELU tanh form), attending to kv rows + itself."""
    x, w, kv = x.astype(np.float64), [p.astype(np.float64) for p in w], kv.astype(np.float64)
    c = x.shape[1]

    def ln(v, g, b):
        return (v - v.mean()) / np.sqrt(v.var() + eps) * g + b
    qkv = ln(x, w[0], w[1]) @ w[2] + w[3]
    kvs = np.vstack([kv, qkv[:, c:]])
    hd = c // n_head
    att = []
    for h in range(n_head):
        q = qkv[0, h * hd:(h + 1) * hd]
        k, v = kvs[:, h * hd:(h + 1) * hd], kvs[:, c + h * hd:c + (h + 1) * hd]
        s = k @ q / np.sqrt(hd)
        p = np.exp(s - s.max())
        att.append(p / p.sum() @ v)
    x = x + np.concatenate(att)[None] @ w[4] + w[5]
    a = ln(x, w[6], w[7]) @ w[8] + w[9]
    a = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
    return x + a @ w[10] + w[11], qkv[0, C:]


def test_block_in_numpy(rng: np.random.Generator) -> None:
    shapes = [(1, C), (1, C), (C, 3 * C), (1, 3 * C), (C, C), (1, C), (1, C), (1, C), (C, 4 * C), (1, 4 * C),
              (4 * C, C), (1, C)]
    w = [(0.3 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    x = rng.standard_normal((1, C)).astype(np.float32)
    for past in (0, 5):
        kv = rng.standard_normal((past, 2 * C)).astype(np.float32)
        y, row = gpt2_block_step(x, w, kv, past, H, 1e-5)
        want_y, want_row = ref_block(x, w, kv, H, 1e-5)
        assert np.abs(y - want_y).max() <= 1e-5 * max(1.0, np.abs(want_y).max())
        assert np.abs(row - want_row).max() <= 1e-5 * max(1.0, np.abs(want_row).max())
    assert block_shapes(w, C) == []
    assert block_shapes(w[:2] + [w[2][:, :-1]] + w[3:], C) == [(2, (C, 3 * C - 1), (C, 3 * C))]


@pytest.fixture(scope="module")
def tiny(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> None:
    import_tiny(conn, tmp_path_factory.mktemp("bs"), MODEL, initializer_range=0.4)


@pytest.fixture
def settings(conn: psycopg.Connection, tiny: None) -> Iterator[None]:
    yield
    for s in ("pg_llm.fused_decode", "pg_llm.weight_cache_mb"):
        conn.execute("SELECT set_config(%s, '', FALSE)", (s,))


def decode(conn: psycopg.Connection, chunks: list[list[int]], fused: bool = True,
           caches: list[int] | None = None, past: int = 0) -> tuple[list[bytes], list[int]]:
    """Logits payloads of llm_gpt2_forward_cached over successive chunks (first = prefill) and the caches."""
    conn.execute("SELECT set_config('pg_llm.fused_decode', %s, FALSE)", ("on" if fused else "off",))
    if caches is None:
        caches = conn.execute("SELECT llm_internal.llm_kv_cache_create(%s)", (MODEL,)).fetchone()[0]
    out = []
    for chunk in chunks:
        logits = conn.execute("SELECT llm_internal.llm_gpt2_forward_cached(%s, %s, %s, %s)",
                              (MODEL, chunk, past, caches)).fetchone()[0]
        out.append(conn.execute("SELECT string_agg(data, ''::BYTEA ORDER BY tr, tc) FROM llm_tile "
                                "WHERE tensor_id = %s", (logits,)).fetchone()[0])
        past += len(chunk)
    return out, caches


def cache_bytes(conn: psycopg.Connection, caches: list[int]) -> bytes:
    return conn.execute("SELECT string_agg(data, ''::BYTEA ORDER BY tensor_id DESC, tr) FROM llm_tile "
                        "WHERE tensor_id = ANY(%s)", (caches,)).fetchone()[0]


STEPS = [[5, 17, 250, 3], [42], [7], [300], [0]]


def test_fused_equals_chain(conn: psycopg.Connection, settings: None) -> None:
    fused, cf = decode(conn, STEPS)
    chain, cc = decode(conn, STEPS, fused=False)
    assert fused == chain and cache_bytes(conn, cf) == cache_bytes(conn, cc)
    conn.execute("SELECT set_config('pg_llm.weight_cache_mb', '0', FALSE)")
    off, co = decode(conn, STEPS)
    assert off == fused and cache_bytes(conn, co) == cache_bytes(conn, cf)


def test_fused_after_weight_update(conn: psycopg.Connection, settings: None) -> None:
    decode(conn, STEPS)  # weights cached
    w = conn.execute("SELECT llm_param(%s, 'h.1.mlp.c_fc.weight')", (MODEL,)).fetchone()[0]
    with conn.transaction():
        conn.execute("UPDATE llm_tile SET data = llm_internal.llm_mk_add(data, data) "
                     "WHERE tensor_id = %s AND tr = 0 AND tc = 0", (w,))
        fused, _ = decode(conn, STEPS)
        conn.execute("SELECT set_config('pg_llm.weight_cache_mb', '0', FALSE)")
        want, _ = decode(conn, STEPS, fused=False)
        conn.execute("SELECT set_config('pg_llm.weight_cache_mb', '', FALSE)")
        assert fused == want
        raise psycopg.Rollback
    assert decode(conn, STEPS)[0] != fused  # the rollback restored the weights: and the cache saw it


def test_rolled_back_step_not_reused(conn: psycopg.Connection, settings: None) -> None:
    """Steps 4 and 5 in a transaction that rolls back (the KV mirror then holds the aborted row 4), step 4 again
    with another token through the chain (which does not touch the mirror), then step 5 fused: it must read
    the new row 4, not reuse the aborted one (same position, same count: only its xmin tells them apart)."""
    _, caches = decode(conn, STEPS[:1])
    with conn.transaction():
        decode(conn, [[11], [12]], caches=caches, past=4)
        raise psycopg.Rollback
    got = decode(conn, [[13]], fused=False, caches=caches, past=4)[0] + decode(conn, [[14]], caches=caches, past=5)[0]
    want, _ = decode(conn, [STEPS[0], [13], [14]], fused=False)
    assert got == want[1:]


def test_bad_cache(conn: psycopg.Connection, settings: None) -> None:
    _, caches = decode(conn, STEPS[:1])
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 2", (caches[1],))
    with pytest.raises(psycopg.errors.InternalError_, match=r"holds 3 positions, expected exactly 0 \.\. 3"):
        decode(conn, [[1]], caches=caches, past=4)
    wrong = conn.execute("SELECT llm_tensor_create('c', ARRAY[37, 96], ARRAY[2, 96], 'cache')").fetchone()[0]
    with pytest.raises(psycopg.errors.RaiseException, match="is not a KV cache"):
        decode(conn, [[1]], caches=[caches[0], wrong], past=4)


def test_generation_forgets_kv_mirrors(conn: psycopg.Connection, settings: None) -> None:
    _, caches = decode(conn, STEPS)
    assert conn.execute("SELECT llm_internal.llm_weight_cache_forget(%s)", (caches,)).fetchone()[0] > 0  # the 2 mirrors
    assert conn.execute("SELECT llm_internal.llm_weight_cache_forget(%s)", (caches,)).fetchone()[0] == 0
    entries = []
    for _ in range(2):
        conn.execute("SELECT llm_generate_tokens(%s, ARRAY[1, 2], max_new_tokens => 4)", (MODEL,))
        entries.append(conn.execute("SELECT entries FROM llm_weight_cache_stats()").fetchone()[0])
    assert entries[0] == entries[1]  # each generation's 2 mirrors were dropped at its end


def test_missing_parameter(conn: psycopg.Connection, settings: None) -> None:
    _, caches = decode(conn, STEPS[:1])  # the prefill (kernel chain) before the parameter goes
    with pytest.raises(psycopg.errors.RaiseException, match='tensor "h.1.ln_2.bias" .* does not exist'):
        with conn.transaction():
            conn.execute("DELETE FROM llm_tensor WHERE model = %s AND name = 'h.1.ln_2.bias'", (MODEL,))
            decode(conn, [[1]], caches=caches, past=4)
