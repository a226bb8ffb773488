"""Corpus loader: llm_dataset rows equal a numpy re-implementation (documents joined with <|endoftext|>, tail
val split, windows of block_size every stride, targets shifted by one), re-loading is a no-op, the client
(tiktoken) and database (llm_encode) encoders give identical rows, errors write nothing, the CLI; and the
whole Shakespeare corpus when make setup fetched it."""
from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pg_llm.cli import main
from pg_llm.loader.corpus import CorpusError, SqlEncoder, load_corpus, safe_chunks, shakespeare_dir

from helpers import tiktoken_gpt2
from test_tokenizer_text import EDGE, build_documents, samples

EOT = 50256
SHAKESPEARE = shakespeare_dir()


@pytest.fixture(scope="module")
def ref():
    return tiktoken_gpt2()


def expected_rows(ref, texts: list[str], block: int, stride: int, val_fraction: float) -> list[tuple]:
    """numpy re-implementation of the loader's cutting: (split, pos, tokens, targets)."""
    ids: list[int] = []
    for i, t in enumerate(x for x in texts if x):
        ids += ([EOT] if i else []) + ref.encode(t, allowed_special="all")
    stream = np.asarray(ids)
    n_val = int(round(len(stream) * val_fraction))
    rows = []
    for split, part in (("train", stream[:len(stream) - n_val]), ("val", stream[len(stream) - n_val:])):
        if len(part) < block + 1:
            continue
        win = np.lib.stride_tricks.sliding_window_view(part, block + 1)[::stride]
        rows += [(split, k * stride, w[:-1].tolist(), w[1:].tolist()) for k, w in enumerate(win)]
    return rows


def stored_rows(db: psycopg.Connection, dataset: str) -> list[tuple]:
    return db.execute("SELECT split, pos, tokens, targets FROM llm_dataset WHERE dataset = %s "
                      "ORDER BY split = 'val', pos", (dataset,)).fetchall()


def total_rows(db: psycopg.Connection) -> int:
    return db.execute("SELECT count(*) + (SELECT count(*) FROM llm_dataset_source) FROM llm_dataset").fetchone()[0]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("corpus")
    texts = list(samples().values()) + build_documents()[-12:] + ["<|endoftext|>".join(EDGE)]
    for i, t in enumerate(texts):
        (d / f"doc{i:02d}.txt").write_text(t, encoding="utf-8", newline="")
    (d / "empty.txt").write_text("")  # empty files are skipped
    return d, texts


@pytest.mark.parametrize("block,stride,val", [(64, None, 0.1), (64, 17, 0.25), (300, 1000, 0.0), (7, 3, 0.5)])
def test_rows_match_numpy(db: psycopg.Connection, ref, corpus_dir, block: int, stride: int | None,
                          val: float) -> None:
    d, texts = corpus_dir
    name = f"np-{block}-{stride}-{val}"
    r = load_corpus(db, name, [str(d)], block_size=block, stride=stride, val_fraction=val)
    want = expected_rows(ref, texts, block, stride or block, val)
    got = stored_rows(db, name)
    assert (r.train_rows, r.val_rows) == (sum(w[0] == "train" for w in want), sum(w[0] == "val" for w in want))
    assert len(got) == len(want) and got == want
    assert r.documents == len(texts) and r.loaded


def test_reload_is_idempotent_and_encoders_agree(db: psycopg.Connection, corpus_dir) -> None:
    d, _ = corpus_dir
    first = load_corpus(db, "idem", [str(d / "*.txt")], block_size=32, stride=20)
    n = total_rows(db)
    again = load_corpus(db, "idem", [str(d)], block_size=32, stride=20)  # same files, via the directory
    assert not again.loaded and again.source_hash == first.source_hash and total_rows(db) == n
    sql = load_corpus(db, "idem-sql", [str(d)], block_size=32, stride=20, encoder="sql")
    assert sql.tokens == first.tokens > 1000
    assert stored_rows(db, "idem-sql") == stored_rows(db, "idem")
    other = load_corpus(db, "idem", [str(d / "doc00.txt")], block_size=32)  # another source: added
    assert other.loaded and total_rows(db) > n


def test_chunked_sql_encoding_is_exact(db: psycopg.Connection, ref) -> None:
    """Long documents are sent to llm_encode in chunks cut where the pre-tokenizer always has a boundary."""
    text = "".join(build_documents())
    chunks = safe_chunks(text, 2000)
    assert "".join(chunks) == text and len(chunks) > 50
    assert SqlEncoder(db, "gpt2", chunk=2000).encode(text).tolist() == ref.encode(text, allowed_special="all")


def test_stdin(db: psycopg.Connection, ref, monkeypatch: pytest.MonkeyPatch) -> None:
    text = samples()["prose.txt"]
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    r = load_corpus(db, "stdin", ["-"], block_size=50, val_fraction=0.2)
    assert stored_rows(db, "stdin") == expected_rows(ref, [text], 50, 50, 0.2) and r.documents == 1


def test_errors_write_nothing(db: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = total_rows(db)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short.")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    cases = [([str(tmp_path / "empty.txt")], {}, "empty input"), (["-"], {}, "empty input"),
             ([str(tmp_path / "nope*.txt")], {}, "no such file"), ([str(tmp_path / "latin1.txt")], {}, "not UTF-8"),
             ([str(tmp_path / "short.txt")], {}, "needs at least 1025"),
             ([str(tmp_path / "short.txt")], {"block_size": 2, "tokenizer": "nope"}, "does not exist"),
             ([str(tmp_path / "short.txt")], {"val_fraction": 1.0}, "val-fraction"),
             ([str(tmp_path / "short.txt")], {"block_size": 0}, "must be positive"),
             ([str(tmp_path / "short.txt")], {"block_size": 2, "stride": 0}, "must be positive")]
    for paths, kw, message in cases:
        with pytest.raises((CorpusError, psycopg.Error, ValueError), match=message):
            load_corpus(db, "bad", paths, **kw)
        assert total_rows(db) == n, message
    load_corpus(db, "blocks", [str(tmp_path / "short.txt")], block_size=2)
    with pytest.raises(CorpusError, match="block size 2"):
        load_corpus(db, "blocks", [str(tmp_path / "short.txt")], block_size=1)
    r = load_corpus(db, "blocks", [str(tmp_path / "short.txt")], block_size=1, replace=True)
    assert r.loaded and db.execute("SELECT block_size FROM llm_datasets WHERE dataset = 'blocks'").fetchone()[0] == 1


def test_cli(db: psycopg.Connection, dsn: str, corpus_dir, capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = corpus_dir
    assert main(["corpus", "load", "--name", "cli", str(d), "--block-size", "128", "--stride", "64", "-q",
                 "--dsn", dsn]) == 0
    assert "into dataset 'cli'" in capsys.readouterr().out
    assert main(["corpus", "list", "--dsn", dsn]) == 0
    assert "cli\ttokenizer=gpt2\tblock=128" in capsys.readouterr().out
    assert main(["corpus", "load", "--name", "cli", str(d), "--block-size", "128", "--stride", "64", "-q",
                 "--dsn", dsn]) == 0
    assert "already loaded" in capsys.readouterr().out
    assert main(["corpus", "drop", "--name", "cli", "--dsn", dsn]) == 0
    assert db.execute("SELECT count(*) FROM llm_dataset WHERE dataset = 'cli'").fetchone()[0] == 0
    assert main(["corpus", "load", "--name", "x", str(d / "empty.txt"), "--dsn", dsn]) == 1
    assert "empty input" in capsys.readouterr().err


@pytest.mark.skipif(len(list(SHAKESPEARE.glob("*.txt"))) != 38, reason=f"{SHAKESPEARE}: run make setup")
def test_shakespeare(db: psycopg.Connection, ref) -> None:
    texts = [p.read_text(encoding="utf-8") for p in sorted(SHAKESPEARE.glob("*.txt"))]
    r = load_corpus(db, "shakespeare", [str(SHAKESPEARE)], block_size=1024, val_fraction=0.1)
    want = expected_rows(ref, texts, 1024, 1024, 0.1)
    assert r.tokens > 1_400_000 and (r.train_rows, r.val_rows) == (1346, 149)
    assert stored_rows(db, "shakespeare") == want
    s = load_corpus(db, "shakespeare-sql", [str(SHAKESPEARE)], block_size=1024, encoder="sql")
    assert s.tokens == r.tokens
    assert db.execute("""SELECT count(*) FROM (SELECT split, pos, tokens FROM llm_dataset WHERE dataset = 'shakespeare'
                         EXCEPT SELECT split, pos, tokens FROM llm_dataset WHERE dataset = 'shakespeare-sql') AS d"""
                      ).fetchone()[0] == 0


def test_another_roles_dataset_is_not_replaced(db: psycopg.Connection, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("A few words for a dataset of another role.")
    load_corpus(db, "theirs", [str(tmp_path / "a.txt")], block_size=2)
    role = "corpus_trainer_" + uuid.uuid4().hex[:6]
    db.execute(f"CREATE ROLE {role} IN ROLE llm_trainer")
    db.execute(f"SET ROLE {role}")
    try:
        with pytest.raises(CorpusError, match="dataset 'theirs' belongs to role"):
            load_corpus(db, "theirs", [str(tmp_path / "a.txt")], block_size=1, replace=True)
        load_corpus(db, "mine", [str(tmp_path / "a.txt")], block_size=2)  # a trainer loads its own
    finally:
        db.execute("RESET ROLE")
    owners = dict(db.execute("SELECT dataset, owner::TEXT FROM llm_dataset_source "
                             "WHERE dataset IN ('theirs', 'mine')").fetchall())
    assert owners == {"theirs": "postgres", "mine": role} or owners["mine"] == role
    db.execute("SELECT llm_dataset_drop('mine')")
    db.execute(f"DROP ROLE {role}")
