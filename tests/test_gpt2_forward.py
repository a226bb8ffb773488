"""GPT-2 forward in SQL vs transformers GPT2LMHeadModel (CPU): logits, loss, input errors."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from gpt2_fixtures import import_tiny


@pytest.fixture(scope="module")
def tiny(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory):
    return import_tiny(conn, tmp_path_factory.mktemp("gpt2"), "tiny")


def ref_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_logits_last_position(conn: psycopg.Connection, tiny, rng: np.random.Generator, forward_path: str) -> None:
    tokens = rng.integers(0, 301, 23).tolist()
    got = np.array(conn.execute("SELECT llm_logits('tiny', %s)", (tokens,)).fetchone()[0])
    want = ref_logits(tiny, tokens)[-1]
    assert got.shape == (301,)
    assert np.abs(got - want).max() <= 1e-4


def test_logits_all_positions_full_context(conn: psycopg.Connection, tiny, rng: np.random.Generator,
                                           forward_path: str) -> None:
    tokens = rng.integers(0, 301, 37).tolist()
    rows = conn.execute("SELECT pos, logits FROM llm_logits_all('tiny', %s) ORDER BY pos", (tokens,)).fetchall()
    assert [p for p, _ in rows] == list(range(37))
    got = np.array([r for _, r in rows])
    assert np.abs(got - ref_logits(tiny, tokens)).max() <= 1e-4


def test_loss_matches_reference(conn: psycopg.Connection, tiny, rng: np.random.Generator, forward_path: str) -> None:
    seq = rng.integers(0, 301, 30).tolist()
    tokens, targets = seq[:-1], seq[1:]
    got = conn.execute("SELECT llm_loss('tiny', %s, %s, training => false)", (tokens, targets)).fetchone()[0]
    want = torch.nn.functional.cross_entropy(torch.tensor(ref_logits(tiny, tokens)), torch.tensor(targets)).item()
    assert abs(got - want) / want <= 1e-5


def test_batched_sequences(conn: psycopg.Connection, tiny, rng: np.random.Generator, forward_path: str) -> None:
    seqs = rng.integers(0, 301, (3, 11))
    targets = rng.integers(0, 301, (3, 11))
    got = conn.execute("SELECT llm_loss('tiny', %s, %s, seq_len => 11)",
                       (seqs.ravel().tolist(), targets.ravel().tolist())).fetchone()[0]
    with torch.no_grad():
        logits = tiny(torch.tensor(seqs)).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 301), torch.tensor(targets).reshape(-1)).item()
    assert abs(got - want) / want <= 1e-5


def test_scratch_is_released(conn: psycopg.Connection, tiny) -> None:
    before = conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0]
    conn.execute("SELECT llm_logits('tiny', ARRAY[1, 2, 3])")
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0] == before


@pytest.mark.parametrize("sql,args,match", [
    ("SELECT llm_logits('nope', ARRAY[1])", (), 'unknown model "nope"'),
    ("SELECT llm_logits('tiny', ARRAY[]::int[])", (), "empty input"),
    ("SELECT llm_logits('tiny', ARRAY[1, 301])", (),
     r"token id 301 at position 2 is outside the vocabulary \[0, 301\)"),
    ("SELECT llm_logits('tiny', ARRAY[-1])", (), "token id -1 at position 1 is outside"),
    ("SELECT llm_logits('tiny', ARRAY[1, NULL, 3])", (), "token id NULL at position 2 is outside"),
    ("SELECT llm_logits('tiny', '{{1,2},{3,4}}')", (), r"one-dimensional int\[\], got 2 dimensions \[1:2\]\[1:2\]"),
    ("SELECT llm_logits('tiny', %s)", (list(range(38)),), "38 tokens in a sequence, more than its context of 37"),
    ("SELECT llm_loss('tiny', ARRAY[1, 2], ARRAY[1])", (), "2 tokens but 1 targets"),
])
def test_bad_input(conn: psycopg.Connection, tiny, sql: str, args: tuple, match: str) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match=match):
        conn.execute(sql, args)


@pytest.mark.slow
def test_gpt2_small_64_tokens(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory,
                              rng: np.random.Generator) -> None:
    """The full GPT-2 small config (random weights: no pretrained GPT-2 is reachable here), 64 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pg_llm.loader.model import import_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    path = tmp_path_factory.mktemp("gpt2small") / "gpt2"
    model.save_pretrained(path)
    import_model(conn, path, "gpt2-small-random", replace=True)
    tokens = rng.integers(0, 50257, 65).tolist()
    rows = conn.execute("SELECT pos, logits FROM llm_logits_all('gpt2-small-random', %s) ORDER BY pos",
                        (tokens[:-1],)).fetchall()
    got = np.array([r for _, r in rows])
    want = ref_logits(model, tokens[:-1])
    assert np.abs(got - want).max() <= 1e-4
    loss = conn.execute("SELECT llm_loss('gpt2-small-random', %s, %s)", (tokens[:-1], tokens[1:])).fetchone()[0]
    ref = torch.nn.functional.cross_entropy(torch.tensor(want), torch.tensor(tokens[1:])).item()
    assert abs(loss - ref) / ref <= 1e-5
