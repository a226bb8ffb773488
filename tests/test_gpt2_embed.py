"""The fused training input (ops/gpt2_embed.py) on a ragged shape (two sequences of 7 tokens with repeats, 16 x 16
weight tiles, 5-row activation tiles): the chain's embedding + add + dropout forward exactly, its backward against
torch autograd in float64, and the tied head's gradient kept in memory (llm_head_nll with a tape) folded into wte's."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels.dropout import dropout_rows

from conftest import close
from helpers import call, get, param, put, refused

V, P, C, T = 53, 20, 48, 7
TOKENS = [3, 51, 3, 0, 17, 52, 3, 9, 9, 1, 2, 40, 51, 8]  # B = 2 sequences of T; repeats accumulate
EMBED = "llm_internal.llm_gpt2_embed(%s, %s, %s, 7, %s, 9, 0, 5)"


@pytest.fixture(scope="module")
def weights(conn: psycopg.Connection) -> tuple[np.ndarray, np.ndarray, int, int]:
    rng = np.random.default_rng(11)
    wte, wpe = (rng.standard_normal((n, C)).astype(np.float32) for n in (V, P))
    return wte, wpe, param(conn, wte, "wte.weight", "emb", tile=(16, 16)), param(conn, wpe, "wpe.weight", "emb",
                                                                                  tile=(16, 16))


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_forward_is_the_chains(conn: psycopg.Connection, weights, rate: float) -> None:
    wte, wpe, ite, ipe = weights
    x = get(conn, call(conn, f"SELECT {EMBED}", ite, ipe, TOKENS, rate))
    pos = np.arange(len(TOKENS)) % T
    want = wte[TOKENS] + wpe[pos]
    assert np.array_equal(x, dropout_rows(want, rate, 9, 5, 16) if rate else want)
    chain = call(conn, "SELECT llm_dropout(llm_add(llm_embedding(%s::BIGINT, "
                       "%s::INT[], NULL, 5), llm_embedding(%s::BIGINT, %s::INT[], NULL, 5)), %s, 9)",
                 ite, TOKENS, ipe, pos.tolist(), rate)
    assert np.array_equal(x, get(conn, chain))


def test_the_second_sequence_alone_gets_the_batchs_masks(conn: psycopg.Connection, weights) -> None:
    """A data-parallel rank's share (the second sequence, first row 7): its rows of the whole batch's x, dropout
    on, forward and backward (whose gradient of wpe is then the batch's with the first sequence's dx zero)."""
    _, _, ite, ipe = weights
    x = get(conn, call(conn, f"SELECT {EMBED}", ite, ipe, TOKENS, 0.3))
    part = get(conn, call(conn, "SELECT llm_internal.llm_gpt2_embed(%s, %s, %s, 7, 0.3, 9, 7, 5)", ite, ipe,
                          TOKENS[T:]))
    assert np.array_equal(part, x[T:])
    dx = np.arange(len(TOKENS) * C, dtype=np.float32).reshape(-1, C) / 100
    dx[:T] = 0
    bwd = "SELECT llm_internal.llm_gpt2_embed_backward(%s, %s, %s, %s, 7, 0.3, 9, %s, 5, NULL)"
    whole = call(conn, bwd, put(conn, dx, (5, 16)), ite, ipe, TOKENS, 0)
    half = call(conn, bwd, put(conn, dx[T:], (5, 16)), ite, ipe, TOKENS[T:], T)
    assert np.array_equal(get(conn, half[1]), get(conn, whole[1]))


def test_backward_equals_torch_with_the_heads_gradient(conn: psycopg.Connection, weights,
                                                       rng: np.random.Generator) -> None:
    wte, wpe, ite, ipe = weights
    dx = rng.standard_normal((len(TOKENS), C)).astype(np.float32)
    idx = put(conn, dx, (5, 16))
    tape = 987654321  # any tape id: the head's gradient waits in this backend's memory under it
    h = put(conn, rng.standard_normal((len(TOKENS), C)).astype(np.float32), (5, 16))
    tgt = rng.integers(0, V, len(TOKENS)).tolist()
    dhead = call(conn, "SELECT dhead FROM llm_internal.llm_head_nll(%s, %s, %s, 1, NULL)", h, ite, tgt)
    kept = call(conn, "SELECT dhead FROM llm_internal.llm_head_nll(%s, %s, %s, 1, %s)", h, ite, tgt, tape)
    assert kept is None
    dte, dpe = call(conn, "SELECT llm_internal.llm_gpt2_embed_backward(%s, %s, %s, %s, 7, 0.3, 9, 0, 5, %s)", idx,
                    ite, ipe, TOKENS, tape)
    assert call(conn, "SELECT llm_internal.llm_head_nll_flush(%s, %s)", tape, ite) is None  # taken by the embedding
    tw, tp = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (wte, wpe))
    mask = torch.tensor(dropout_rows(np.ones_like(dx), 0.3, 9, 5, 16), dtype=torch.float64)
    ((tw[TOKENS] + tp[torch.arange(len(TOKENS)) % T]) * mask).backward(torch.tensor(dx, dtype=torch.float64))
    close(get(conn, dte), tw.grad.numpy() + get(conn, dhead))
    close(get(conn, dpe), tp.grad.numpy())


def test_an_untaken_heads_gradient_is_flushed(conn: psycopg.Connection, weights, rng: np.random.Generator) -> None:
    _, _, ite, _ = weights
    h = put(conn, rng.standard_normal((len(TOKENS), C)).astype(np.float32), (5, 16))
    tgt = rng.integers(0, V, len(TOKENS)).tolist()
    dhead = conn.execute("SELECT dhead FROM llm_internal.llm_head_nll(%s, %s, %s)", (h, ite, tgt)).fetchone()[0]
    conn.execute("SELECT llm_internal.llm_head_nll(%s, %s, %s, 1, 5)", (h, ite, tgt))
    flushed = call(conn, "SELECT llm_internal.llm_head_nll_flush(5, %s)", ite)
    assert np.array_equal(get(conn, flushed), get(conn, dhead))
    assert call(conn, "SELECT llm_internal.llm_head_nll_flush(5, %s)", ite) is None  # once


@pytest.mark.parametrize("tokens, seq, rate, msg", [
    ([3, 53], 2, 0.0, r"token id is NULL or outside \[0, 53\)"),
    ([3, 4, 5], 2, 0.0, "3 tokens are not sequences of 2 positions"),
    ([3] * 21, 21, 0.0, "not sequences of 21 positions .wpe has 20"),
    ([3, 4], 2, 1.0, "dropout must be in"),
])
def test_errors(conn: psycopg.Connection, weights, tokens: list[int], seq: int, rate: float, msg: str) -> None:
    _, _, ite, ipe = weights
    refused(conn, msg, "SELECT llm_internal.llm_gpt2_embed(%s, %s, %s, %s, %s, 9, 0, 5)", ite, ipe, tokens, seq, rate)


def test_adamw_on_held_gradients(conn: psycopg.Connection, weights, rng: np.random.Generator) -> None:
    """A tape that holds its gradients (ops/held.py): the embedding backward writes no tile of them, and AdamW on
    the held wte gradient (param, m and v from the weight cache, the new ones adopted) gives the parameters and
    moments AdamW gives on the written gradient, over two steps."""
    wte, _, ite, ipe = weights
    dx = put(conn, rng.standard_normal((len(TOKENS), C)).astype(np.float32), (5, 16))
    bwd = "SELECT llm_internal.llm_gpt2_embed_backward(%s, %s, %s, %s, 7, 0, NULL, 0, 5, %s)"
    written = call(conn, bwd, dx, ite, ipe, TOKENS, None)
    tape = 99887766
    conn.execute("SELECT llm_internal.llm_mk_hold(%s, TRUE)", (tape,))
    held = call(conn, bwd, dx, ite, ipe, TOKENS, tape)
    assert call(conn, "SELECT count(*) FROM llm_tile WHERE tensor_id = ANY(%s::BIGINT[])", held) == 0
    out = []
    for name, grad in (("a", written[0]), ("b", held[0])):
        w = param(conn, wte, f"{name}.weight", "emb", tile=(16, 16))
        m, v = conn.execute("SELECT * FROM llm_internal.llm_adamw_state(%s)", (w,)).fetchone()
        conn.execute("SELECT llm_internal.llm_head_nll(%s, %s, %s)", (dx, w, TOKENS))  # caches w whole
        hits = []
        for step in (1, 2):
            conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, %s, 0.1)", (w, grad, m, v, step))
            hits.append(call(conn, "SELECT hits FROM llm_weight_cache_stats()"))
        if grad in held:  # the second step took param, m and v from the cache (the first step adopted them)
            assert hits[1] - hits[0] == 3
        out.append([get(conn, t) for t in (w, m, v)])
    assert conn.execute("SELECT llm_internal.llm_mk_hold(%s, FALSE)", (tape,)).fetchone()[0] == 2
    assert all(np.array_equal(a, b) for a, b in zip(*out, strict=True))
