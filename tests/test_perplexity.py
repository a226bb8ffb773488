"""Sliding-window perplexity (api/perplexity.sql) and per-row NLL (kernels/nll.sql) against torch references on
tiny GPT-2s: token ids, text, dataset splits, strides, exact token counts, input errors."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from gpt2_fixtures import import_tiny
from helpers import put

N_CTX, VOCAB = 37, 301


@pytest.fixture(scope="module")
def tiny(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory):
    return import_tiny(conn, tmp_path_factory.mktemp("ppl"), "ppl_tiny", initializer_range=0.4)


def reference(model, seq: list[int], stride: int, n_ctx: int = N_CTX) -> tuple[float, int, float]:
    """The Hugging Face guide's loop in torch (float64 log-softmax), counting the scored tokens exactly:
    window seq[begin:end], the last end - prev_end tokens are targets, a target needs a token before it."""
    ids = torch.tensor([seq])
    total, count, prev = 0.0, 0, 0
    for begin in range(0, len(seq), stride):
        end = min(begin + n_ctx, len(seq))
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, begin:end]).logits[0].double(), -1)
        for t in range(max(prev, begin + 1), end):
            total -= float(logp[t - 1 - begin, seq[t]])
            count += 1
        prev = end
        if end == len(seq):
            break
    return float(np.exp(total / count)), count, total / count


def guide_count(length: int, stride: int, n_ctx: int = N_CTX) -> int:
    """What the Hugging Face guide divides by: sum over windows of (trg_len - 1)."""
    count, prev = 0, 0
    for begin in range(0, length, stride):
        end = min(begin + n_ctx, length)
        count += end - prev - 1
        prev = end
        if end == length:
            break
    return count


def ppl(conn: psycopg.Connection, sql: str, *args: object) -> tuple[float, int, float]:
    return conn.execute(f"SELECT perplexity, tokens_scored, mean_loss FROM {sql}", args).fetchone()


@pytest.mark.parametrize("stride", [None, 37, 16, 5, 1])
def test_tokens_match_reference(conn: psycopg.Connection, tiny, stride: int | None, forward_path: str) -> None:
    seq = np.random.default_rng(3).integers(0, VOCAB, 100).tolist()  # 2.7 contexts long
    got = ppl(conn, "llm_perplexity_tokens('ppl_tiny', %s, stride => %s)", seq, stride)
    want = reference(tiny, seq, stride or N_CTX)
    assert got[1] == want[1]
    # stride < n_ctx scores every token but the first; stride = n_ctx skips each window's first token
    assert got[1] == (99 if (stride or N_CTX) < N_CTX else 99 - 2)
    assert abs(got[0] - want[0]) / want[0] <= 1e-5
    assert abs(got[2] - want[2]) / want[2] <= 1e-5
    assert abs(np.log(got[0]) - got[2]) <= 1e-12
    # the guide's own count (num_valid_tokens - 1 per window) misses one token per overlapping window
    s = stride or N_CTX
    windows = next(i + 1 for i, b in enumerate(range(0, 100, s)) if b + N_CTX >= 100)
    assert guide_count(100, s) == got[1] - (windows - 1 if s < N_CTX else 0)


def test_short_sequence_is_exp_of_loss(conn: psycopg.Connection, tiny) -> None:
    seq = list(range(3, 40, 2))  # 19 tokens: one window
    got = ppl(conn, "llm_perplexity_tokens('ppl_tiny', %s)", seq)
    loss = conn.execute("SELECT llm_loss('ppl_tiny', %s, %s)", (seq[:-1], seq[1:])).fetchone()[0]
    assert got[1] == 18 and abs(got[2] - loss) <= 1e-6 * loss
    two = ppl(conn, "llm_perplexity_tokens('ppl_tiny', ARRAY[7, 8])")
    assert two[1] == 1 and abs(two[0] - reference(tiny, [7, 8], 37)[0]) <= 1e-5 * two[0]


def test_nll_rows(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    logits = (rng.standard_normal((23, 301)) * 4).astype(np.float32)
    tid = put(conn, logits, tile=(7, 64))  # ragged tiles both ways
    targets = rng.integers(0, 301, 15).tolist()
    got = conn.execute("SELECT llm_internal.llm_nll(%s, %s, 5)", (tid, targets)).fetchone()[0]
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[5:20], dtype=torch.float64),
                                             torch.tensor(targets), reduction="none").numpy()
    assert np.abs(np.array(got) - want).max() <= 1e-9
    assert conn.execute("SELECT llm_internal.llm_nll(%s, ARRAY[]::int[], 23)", (tid,)).fetchone()[0] == []
    with pytest.raises(psycopg.errors.RaiseException, match=r"rows 20 \.\. 23 are outside logits"):
        conn.execute("SELECT llm_internal.llm_nll(%s, ARRAY[1, 2, 3, 4], 20)", (tid,))
    with pytest.raises(psycopg.errors.RaiseException, match=r"target 301 \(index 1\) is out of range"):
        conn.execute("SELECT llm_internal.llm_nll(%s, ARRAY[1, 301])", (tid,))


def test_text_form(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> None:
    from pg_llm.loader.tokenizer import ensure_gpt2

    ensure_gpt2(conn)
    model = import_tiny(conn, tmp_path_factory.mktemp("ppl"), "ppl_text", seed=1, vocab_size=50257)
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness, it was the epoch of belief, it was the epoch of incredulity.")
    ids = conn.execute("SELECT llm_encode(%s)", (text,)).fetchone()[0]
    assert len(ids) > N_CTX
    got = ppl(conn, "llm_perplexity('ppl_text', %s, stride => 10)", text)
    assert got == ppl(conn, "llm_perplexity_tokens('ppl_text', %s, stride => 10)", ids)
    want = reference(model, ids, 10)
    assert got[1] == want[1] == len(ids) - 1 and abs(got[0] - want[0]) / want[0] <= 1e-5
    positional = ppl(conn, "llm_perplexity('ppl_text', %s)", text)  # unambiguous: the text form
    assert positional == ppl(conn, "llm_perplexity(model => 'ppl_text', text => %s)", text)
    with pytest.raises(psycopg.errors.RaiseException, match="empty text"):
        conn.execute("SELECT llm_perplexity('ppl_text', '')")


@pytest.mark.parametrize("stride", [None, 7])
def test_texts_form_equals_one_text_at_a_time(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory,
                                             forward_path: str, stride: int | None) -> None:
    """llm_perplexity_texts packs every window of every text into a few forwards: each row equals
    llm_perplexity of its text (texts longer than the context, one token, empty and NULL included)."""
    from pg_llm.loader.tokenizer import ensure_gpt2

    ensure_gpt2(conn)
    if not conn.execute("SELECT count(*) FROM llm_models WHERE name = 'ppl_batch'").fetchone()[0]:
        import_tiny(conn, tmp_path_factory.mktemp("ppl"), "ppl_batch", seed=2, vocab_size=50257)
    texts = ["To be, or not to be, that is the question:", "Hi", None, "",
             "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to take "
             "arms against a sea of troubles and by opposing end them. To die, to sleep, no more; and by a sleep "
             "to say we end the heart-ache and the thousand natural shocks that flesh is heir to.",
             "Ay, there's the rub."] * 3
    rows = conn.execute("SELECT ord, perplexity, tokens_scored, mean_loss FROM llm_perplexity_texts('ppl_batch', %s, "
                        "stride => %s)", (texts, stride)).fetchall()
    assert [r[0] for r in rows] == list(range(1, len(texts) + 1))
    for (_, p, n, m), text in zip(rows, texts, strict=True):
        if text in (None, "", "Hi"):
            assert (p, n, m) == (None, 0, None)
            continue
        want = ppl(conn, "llm_perplexity('ppl_batch', %s, stride => %s)", text, stride)
        assert n == want[1] and abs(m - want[2]) <= 1e-6 * want[2] and abs(p - want[0]) <= 1e-6 * want[0]
    assert max(r[2] for r in rows) > N_CTX  # a text longer than the context: several windows
    with pytest.raises(psycopg.errors.RaiseException, match="texts is NULL"):
        conn.execute("SELECT * FROM llm_perplexity_texts('ppl_batch', NULL)")


def add_source(conn: psycopg.Connection, name: str, split: str, stream: list[int], block: int, stride: int,
               source: str = "h1") -> None:
    """Rows as pg-llm corpus load cuts a split's stream: windows of block + 1 tokens every stride tokens."""
    conn.execute("INSERT INTO llm_dataset_source (dataset, source_hash, tokenizer, block_size, stride, val_fraction, "
                 "documents, tokens, train_rows, val_rows, encoder, sources) VALUES (%s, %s, 'gpt2', %s, %s, 0.5, 1, "
                 "%s, 0, 0, 'test', '{}') ON CONFLICT DO NOTHING", (name, source, block, stride, len(stream)))
    for s in range(0, len(stream) - block, stride):
        w = stream[s:s + block + 1]
        conn.execute("INSERT INTO llm_dataset (dataset, split, tokens, targets, source_hash, pos) "
                     "VALUES (%s, %s, %s, %s, %s, %s)", (name, split, w[:-1], w[1:], source, s))


def test_dataset_form(conn: psycopg.Connection, tiny) -> None:
    rng = np.random.default_rng(5)
    stream = rng.integers(0, VOCAB, 91).tolist()
    add_source(conn, "ppl_ds", "val", stream, 16, 10)  # overlapping windows: a token is scored once
    add_source(conn, "ppl_ds", "train", stream[:60], 16, 16)
    covered = stream[:10 * ((91 - 16 - 1) // 10) + 17]  # the tail shorter than a window is not in the table
    for stride in (None, 12):
        got = ppl(conn, "llm_perplexity('ppl_tiny', dataset => 'ppl_ds', stride => %s)", stride)
        want = reference(tiny, covered, stride or N_CTX)
        assert got[1] == want[1] and abs(got[0] - want[0]) / want[0] <= 1e-5
    # windows that leave gaps (stride 20 > block + 1): each contiguous stretch is scored on its own
    gaps = rng.integers(0, VOCAB, 80).tolist()
    add_source(conn, "ppl_gap", "val", gaps, 8, 20, source="h2")
    got = ppl(conn, "llm_perplexity('ppl_tiny', dataset => 'ppl_gap', split => 'val')")
    parts = [reference(tiny, gaps[s:s + 9], N_CTX) for s in range(0, 72, 20)]
    assert got[1] == sum(p[1] for p in parts) == 4 * 8
    assert abs(got[2] - sum(p[2] * p[1] for p in parts) / got[1]) <= 1e-5 * got[2]
    with pytest.raises(psycopg.errors.RaiseException, match='dataset "ppl_ds" has no split "test"') as e:
        conn.execute("SELECT llm_perplexity('ppl_tiny', dataset => 'ppl_ds', split => 'test')")
    assert "ppl_ds/train" in (e.value.diag.message_hint or "")
    add_source(conn, "ppl_big", "val", [1, 2, 400, 3, 4, 5], 4, 1, source="h3")
    with pytest.raises(psycopg.errors.RaiseException, match="has ids outside the vocabulary"):
        conn.execute("SELECT llm_perplexity('ppl_tiny', dataset => 'ppl_big')")


@pytest.mark.parametrize("call,match", [
    ("llm_perplexity_tokens('ppl_tiny', ARRAY[5])", "1 tokens: need at least 2"),
    ("llm_perplexity_tokens('ppl_tiny', ARRAY[]::int[])", "0 tokens: need at least 2"),
    ("llm_perplexity_tokens('ppl_tiny', NULL)", "0 tokens: need at least 2"),
    ("llm_perplexity_tokens('ppl_tiny', ARRAY[5, 301, 6])", r"token id 301 at position 2 is outside the vocabulary"),
    ("llm_perplexity_tokens('ppl_tiny', ARRAY[5, 6], stride => 0)", r"stride must be in \[1, 37\]"),
    ("llm_perplexity_tokens('ppl_tiny', ARRAY[5, 6], stride => 38)", r"stride must be in \[1, 37\]"),
    ("llm_perplexity_tokens('nope', ARRAY[5, 6])", 'unknown model "nope"'),
])
def test_bad_input(conn: psycopg.Connection, tiny, call: str, match: str) -> None:
    before = conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0]
    with pytest.raises(psycopg.errors.RaiseException, match=match):
        conn.execute(f"SELECT * FROM {call}")
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0] == before
