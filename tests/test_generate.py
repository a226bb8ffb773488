"""Sampling with a KV cache (api/generate.sql, kernels/attention_cache.sql) against transformers on tiny GPT-2s:
greedy generation token for token, cached forward logits, top-k/top-p filters, seeded sampling across
sessions, end-of-text and context-length stops, input errors, scratch/cache release."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels.attention_cache import attention_cached
from pg_llm.loader.model import import_model
from pg_llm.loader.tokenizer import ensure_gpt2

from gpt2_fixtures import import_tiny, make_hf_model

INIT = 0.4  # larger than GPT-2's 0.02 so a tiny random model's greedy continuation varies (not one token repeated)
N_CTX, VOCAB = 37, 301


@pytest.fixture(scope="module")
def tiny(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory):
    model = import_tiny(conn, tmp_path_factory.mktemp("gen"), "gen_tiny", initializer_range=INIT)
    model.generation_config.eos_token_id = None  # the fixture's config names 300: compare full lengths
    return model


@pytest.fixture(scope="module")
def texty(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model over GPT-2's vocabulary (50257) and the GPT-2 tokenizer, for the text forms."""
    ensure_gpt2(conn)
    model = import_tiny(conn, tmp_path_factory.mktemp("gen"), "gen_text", seed=1, vocab_size=50257,
                        initializer_range=INIT)
    model.generation_config.eos_token_id = None
    return model


def scratch(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0]


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation and the smallest top-1/top-2 logit margin over its steps."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    margin = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
    return out.sequences[0].tolist(), margin


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(conn: psycopg.Connection, tiny, use_cache: bool) -> None:
    prompt = [5, 17, 200, 3, 99, 250, 41]
    want, margin = hf_greedy(tiny, prompt, 20)
    assert margin > 1e-3, "a near tie would make the comparison meaningless"
    before = scratch(conn)
    got = conn.execute("SELECT llm_generate_tokens('gen_tiny', %s, max_new_tokens => 20, temperature => 0, "
                       "use_cache => %s)", (prompt, use_cache)).fetchone()[0]
    assert got == want  # prompt + 20 new tokens, like transformers' generate
    assert len(set(got[len(prompt):])) > 5  # a real continuation, not one token repeated
    assert scratch(conn) == before  # activations and caches released


def test_cached_forward_logits(conn: psycopg.Connection, tiny, rng: np.random.Generator) -> None:
    """Prefill 9 tokens, then 6 single-token steps: every step's logits equal the full forward's."""
    seq = rng.integers(0, VOCAB, 15).tolist()
    with torch.no_grad():
        want = tiny(torch.tensor([seq])).logits[0].numpy()
    mark, caches = conn.execute("SELECT llm_scratch_mark(), llm_internal.llm_kv_cache_create('gen_tiny')").fetchone()
    assert len(caches) == 2
    rows = []
    for past, chunk, first in [(0, seq[:9], 0)] + [(p, [seq[p]], None) for p in range(9, 15)]:
        logits = conn.execute("SELECT llm_internal.llm_gpt2_forward_cached('gen_tiny', %s, %s, %s, %s)",
                              (chunk, past, caches, first)).fetchone()[0]
        rows += [r[0] for r in conn.execute("SELECT vals FROM llm_tensor_rows(%s) ORDER BY row_index", (logits,))]
    filled = conn.execute("SELECT count(*) FROM llm_tile WHERE tensor_id = ANY(%s)", (caches,)).fetchone()[0]
    conn.execute("SELECT llm_scratch_release(%s)", (mark,))
    assert filled == 2 * 15  # one cache row per position and layer
    got = np.array(rows, dtype=np.float64)  # 9 prefill rows, then one per step
    assert got.shape == (15, VOCAB)
    assert np.abs(got - want).max() <= 1e-4


def test_attention_cached_kernel_in_chunks(rng: np.random.Generator) -> None:
    """The microkernel over chunks (prefill 5, then 1, 3, 1 rows) equals causal attention of the whole."""
    T, C, H, th, tw = 10, 12, 3, 4, 7
    qkv = rng.standard_normal((T, 3 * C)).astype(np.float32)
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, H, -1).transpose(1, 0, 2) for i in range(3))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(C // H) + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, C)
    cache, past, got = b"", 0, []
    for n in (5, 1, 3, 1):
        rows = qkv[past:past + n]
        tiles = [np.ascontiguousarray(rows[r:r + th, c:c + tw]).tobytes()
                 for r in range(0, n, th) for c in range(0, 3 * C, tw)]
        out = list(attention_cached(tiles, cache, n, 3 * C, th, tw, past, H))
        y = np.zeros((n, C), np.float32)
        for t, tr, tc, data in out:
            if t == 0:
                blk = y[tr * th:(tr + 1) * th, tc * min(tw, C):(tc + 1) * min(tw, C)]
                blk[...] = np.frombuffer(data, "<f4").reshape(blk.shape)
            else:
                assert tr == past + len([o for o in out if o[0] == 1 and o[1] < tr])
                cache += data
        got.append(y)
        past += n
    assert np.abs(np.vstack(got) - want).max() <= 1e-5
    assert np.array_equal(np.frombuffer(cache, "<f4").reshape(T, 2 * C), qkv[:, C:])


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 5, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (1.0, 0, 0.5), (1.0, 0, 0.05),
    (0.6, 0, 0.8), (1.3, 20, 0.95), (1.0, 3, 0.999), (2.0, 100, 0.3),
])
def test_filters_match_transformers(conn: psycopg.Connection, temperature: float, top_k: int,
                                    top_p: float) -> None:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = (np.random.default_rng(7).standard_normal(1000) * 3).astype(np.float32)
    assert len(np.unique(logits)) == logits.size  # ties excluded
    scores = torch.tensor(logits)[None]
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = torch.nonzero(scores[0] > -torch.inf).flatten().tolist()
    got = conn.execute("SELECT llm_internal.llm_sample_keep(%s::float4[], temperature => %s, top_k => %s, top_p => %s)",
                       (logits.tolist(), temperature, top_k, top_p)).fetchone()[0]
    assert got == want
    if top_k:
        assert len(got) == top_k or top_p < 1.0


def test_greedy_filter_and_draws(conn: psycopg.Connection) -> None:
    logits = [0.5, 2.0, -1.0, 1.9, 0.0]
    assert conn.execute("SELECT llm_internal.llm_sample_keep(%s::float4[], temperature => 0)",
                        (logits,)).fetchone()[0] == [1]
    # 4000 seeded draws (steps 0..3999) follow softmax(logits / 0.8) restricted to the top 3
    draws = [r[0] for r in conn.execute("SELECT llm_internal.llm_sample(%s::float4[], temperature => 0.8, top_k => 3, "
                                        "seed => 11, step => s) FROM generate_series(0, 3999) AS s",
                                        (logits,)).fetchall()]
    z = np.array(logits) / 0.8
    z[[2, 4]] = -np.inf  # the top 3 are ids 1, 3, 0
    p = np.exp(z - z.max())
    p /= p.sum()
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert np.abs(freq - p).max() < 0.025 and freq[[2, 4]].sum() == 0


def test_seed_reproducible_across_sessions(dsn: str, conn: psycopg.Connection, tiny) -> None:
    q = ("SELECT llm_generate_tokens('gen_tiny', ARRAY[1, 2, 3], max_new_tokens => 12, temperature => 1.0, "
         "top_k => 40, top_p => 0.95, seed => %s)")
    runs = []
    for seed in (42, 42, 43):
        with psycopg.connect(dsn, autocommit=True) as c:  # a separate session (backend) each time
            runs.append(c.execute(q, (seed,)).fetchone()[0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert conn.execute(q, (42,)).fetchone()[0] == runs[0]
    # the cache does not change what is sampled
    assert conn.execute(q.replace("seed => %s)", "seed => %s, use_cache => false)"), (42,)).fetchone()[0] == runs[0]


def test_context_length_stops_with_notice(conn: psycopg.Connection, tiny) -> None:
    prompt = np.random.default_rng(30).integers(0, VOCAB, 30).tolist()  # fixed: a near tie flips a greedy pick
    notices: list[str] = []
    def handler(d: psycopg.errors.Diagnostic) -> None:
        notices.append(d.message_primary or "")
    conn.add_notice_handler(handler)
    try:
        got = conn.execute("SELECT llm_generate_tokens('gen_tiny', %s, max_new_tokens => 20, temperature => 0)",
                           (prompt,)).fetchone()[0]
    finally:
        conn.remove_notice_handler(handler)
    want, margin = hf_greedy(tiny, prompt, N_CTX - 30 + 1)  # the last token is predicted from n_ctx tokens
    assert margin > 1e-3, "a near tie would make the comparison meaningless"
    assert got == want and len(got) == N_CTX + 1
    assert any("stopped after 8 of 20 new tokens" in n and "context of 37" in n for n in notices)
    full = conn.execute("SELECT llm_generate_tokens('gen_tiny', %s, max_new_tokens => 3, temperature => 0)",
                        (list(range(N_CTX)),)).fetchone()[0]
    assert len(full) == N_CTX + 1


def test_eos_stops_generation(conn: psycopg.Connection, tmp_path: Path) -> None:
    """A model whose next-token distribution is fixed with p(<|endoftext|>) = 0.3: with eos the output is the
    eos-less output cut right after its first 50256 (same seed, same draws)."""
    ensure_gpt2(conn)
    m = make_hf_model(tmp_path / "eos", 2, vocab_size=50257, initializer_range=INIT)
    with torch.no_grad():
        u = torch.randn(48)
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(u)  # every position's hidden state is u
        wte = m.transformer.wte.weight
        wte[50256] = 0
        others = torch.logsumexp(wte @ u, 0)
        wte[50256] = u * (others + np.log(0.3 / 0.7)) / (u @ u)
    m.save_pretrained(tmp_path / "eos")
    import_model(conn, tmp_path / "eos", "gen_eos", replace=True)
    q = "SELECT llm_generate_tokens('gen_eos', ARRAY[1, 2], max_new_tokens => 30, seed => %s, eos => %s)"
    for seed in range(5):
        free = conn.execute(q, (seed, False)).fetchone()[0]
        stop = conn.execute(q, (seed, True)).fetchone()[0]
        assert len(free) == 32
        if 50256 in free:
            assert stop == free[:free.index(50256) + 1]
        else:
            assert stop == free
    assert any(50256 in conn.execute(q, (s, False)).fetchone()[0][2:] for s in range(5))
    greedy = conn.execute("SELECT llm_generate_tokens('gen_eos', ARRAY[1], temperature => 0, eos => true)"
                          ).fetchone()[0]
    assert greedy == [1, 50256]  # p(eos) = 0.3 is the largest probability


def test_text_forms(conn: psycopg.Connection, texty) -> None:
    prompt = "The quick brown fox"
    ids = conn.execute("SELECT llm_encode(%s)", (prompt,)).fetchone()[0]
    want, _ = hf_greedy(texty, ids, 8)
    new = want[len(ids):]
    text = conn.execute("SELECT llm_generate('gen_text', %s, max_new_tokens => 8, temperature => 0)",
                        (prompt,)).fetchone()[0]
    assert text == conn.execute("SELECT llm_decode(%s)", (new,)).fetchone()[0]
    notices: list[str] = []
    def handler(d: psycopg.errors.Diagnostic) -> None:
        notices.append(d.message_primary or "")
    conn.add_notice_handler(handler)
    try:
        rows = conn.execute("SELECT step, token_id, token FROM llm_generate_stream('gen_text', %s, "
                            "max_new_tokens => 8, temperature => 0)", (prompt,)).fetchall()
    finally:
        conn.remove_notice_handler(handler)
    assert [r[0] for r in rows] == list(range(8)) and [r[1] for r in rows] == new
    assert [r[2] for r in rows] == [conn.execute("SELECT llm_decode(ARRAY[%s])", (t,)).fetchone()[0] for t in new]
    steps = [n for n in notices if n.startswith("pg_llm: step ")]  # one NOTICE per token, as it is produced
    assert len(steps) == 8 and all(n.startswith(f"pg_llm: step {i}: token {t} ") for i, (t, n) in
                                   enumerate(zip(new, steps, strict=True)))
    assert conn.execute("SELECT llm_generate('gen_text', 'Hi', max_new_tokens => 0)").fetchone()[0] == ""


BAD = [
    ("llm_generate_tokens('gen_tiny', ARRAY[1, 301])",
     r"token id 301 at position 2 is outside the vocabulary \[0, 301\)"),
    ("llm_generate_tokens('gen_tiny', ARRAY[-1])", "token id -1 at position 1 is outside"),
    ("llm_generate_tokens('gen_tiny', ARRAY[]::int[])", "empty input"),
    ("llm_generate_tokens('gen_tiny', NULL)", "empty input"),
    ("llm_generate_tokens('gen_tiny', ARRAY(SELECT generate_series(1, 38)))", "prompt has 38 tokens, more than the "
     "context of 37"),
    ("llm_generate_tokens('gen_tiny', ARRAY[1], temperature => -0.5)", "temperature must be a finite number >= 0"),
    ("llm_generate_tokens('gen_tiny', ARRAY[1], top_k => -1)", "top_k must be >= 0"),
    ("llm_generate_tokens('gen_tiny', ARRAY[1], top_p => 0)", r"top_p must be in \(0, 1\]"),
    ("llm_generate_tokens('gen_tiny', ARRAY[1], top_p => 1.5)", r"top_p must be in \(0, 1\]"),
    ("llm_generate_tokens('gen_tiny', ARRAY[1], max_new_tokens => -1)", "max_new_tokens must be >= 0"),
    ("llm_generate_tokens('gen_tiny', ARRAY[1], seed => -3)", "seed must be >= 0"),
    ("llm_generate_tokens('nope', ARRAY[1])", 'unknown model "nope"'),
    ("llm_generate('gen_tiny', '')", "empty prompt"),
    ("llm_internal.llm_sample_keep('{}'::float4[])", "logits must be a non-empty"),
]


@pytest.mark.parametrize("call,match", BAD)
def test_bad_input(conn: psycopg.Connection, tiny, call: str, match: str) -> None:
    before = scratch(conn)
    with pytest.raises(psycopg.errors.RaiseException, match=match):
        conn.execute(f"SELECT {call}")
    assert scratch(conn) == before


@pytest.mark.parametrize("fused", [True, False])
def test_zero_new_tokens_and_cancel_leave_nothing(conn: psycopg.Connection, tiny, fused: bool) -> None:
    """A cancel stops both loops: the fused one (one call, weights cached: ~1,000 tokens of a 1-layer model with
    a 1,024-token context take ~0.2-0.5 s) and the SQL one (35 tokens of gen_tiny take > 150 ms)."""
    before = scratch(conn)
    assert conn.execute("SELECT llm_generate_tokens('gen_tiny', ARRAY[4, 5], max_new_tokens => 0)"
                        ).fetchone()[0] == [4, 5]
    if fused:
        conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) "
                     "VALUES ('gen-long', 1, 2, 32, 1024, 301) ON CONFLICT DO NOTHING")
        conn.execute("SELECT llm_model_init('gen_long', 'gen-long', seed => 1) WHERE NOT EXISTS "
                     "(SELECT FROM llm_models WHERE name = 'gen_long')")
        call, timeout = "llm_generate_tokens('gen_long', ARRAY[4, 5], max_new_tokens => 1020)", "30ms"
        conn.execute(f"SELECT {call.replace('1020', '2')}")  # weights cached: the timeout hits the loop
    else:
        conn.execute("SET pg_llm.fused_decode = off")
        call, timeout = "llm_generate_tokens('gen_tiny', ARRAY[4, 5], max_new_tokens => 35)", "40ms"
    conn.execute(f"SET statement_timeout = '{timeout}'")
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):  # cancelled mid-generation: rolled back, no leak
            conn.execute(f"SELECT {call}")
    finally:
        conn.execute("RESET statement_timeout")
        conn.execute("RESET pg_llm.fused_decode")
    assert scratch(conn) == before
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE role = 'cache'").fetchone()[0] == 0


def test_fused_generation_equals_the_sql_loop(conn: psycopg.Connection, texty) -> None:
    """The one-call generation (ops/decode.py, the default) and the SQL loop over llm_gpt2_forward_cached
    (pg_llm.fused_decode = off) draw the same tokens and raise the same per-token NOTICEs."""
    q = ("SELECT token_id, token FROM llm_generate_stream('gen_text', 'The king said', max_new_tokens => 15, "
         "temperature => 0.9, top_k => 50, top_p => 0.9, seed => 11, eos => true)")
    out = {}
    for mode in ("on", "off"):
        notices: list[str] = []

        def handler(d: psycopg.errors.Diagnostic, seen: list[str] = notices) -> None:
            seen.append(d.message_primary or "")
        conn.add_notice_handler(handler)
        try:
            conn.execute("SELECT set_config('pg_llm.fused_decode', %s, FALSE)", (mode,))
            out[mode] = (conn.execute(q).fetchall(), notices)
        finally:
            conn.execute("RESET pg_llm.fused_decode")
            conn.remove_notice_handler(handler)
    assert out["on"] == out["off"] and len(out["on"][0]) == 15 and len(out["on"][1]) == 15
