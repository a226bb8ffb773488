"""Tokenizer import: the OpenAI pair, the Hugging Face pair and the tiktoken ranks file give identical GPT-2
tables; a tokenizer trained with Hugging Face tokenizers lives beside GPT-2 and encodes like its reference;
truncated or mismatched files are refused with a clear error and change nothing; the CLI."""
from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest

from pg_llm.assets import gpt2_dir
from pg_llm.cli import main
from pg_llm.loader.tokenizer import ClientEncoder, TokenizerFileError, ensure_gpt2, import_files

from test_tokenizer_text import build_documents, samples

GPT2 = gpt2_dir()
TIKTOKEN = GPT2 / "gpt2.tiktoken"
needs_tiktoken_file = pytest.mark.skipif(not TIKTOKEN.exists(), reason=f"{TIKTOKEN} missing: run make setup")


@pytest.fixture(scope="module")
def db(conn: psycopg.Connection) -> psycopg.Connection:
    ensure_gpt2(conn)
    ensure_gpt2(conn)  # idempotent
    return conn


def counts(db: psycopg.Connection) -> tuple:
    return db.execute("SELECT (SELECT count(*) FROM llm_tokenizer), (SELECT count(*) FROM llm_bpe_vocab), "
                      "(SELECT count(*) FROM llm_bpe_merges), (SELECT string_agg(name, ',' ORDER BY name) "
                      "FROM llm_tokenizer)").fetchone()


def same_tables(db: psycopg.Connection, a: str, b: str) -> bool:
    vocab = """SELECT count(*) FROM (SELECT id, token, printable, special FROM llm_bpe_vocab WHERE tokenizer = %(a)s
               EXCEPT SELECT id, token, printable, special FROM llm_bpe_vocab WHERE tokenizer = %(b)s) AS d"""
    merges = """SELECT count(*) FROM (
                  SELECT rank, left_id, right_id, merged_id FROM llm_bpe_merges WHERE tokenizer = %(a)s
                  EXCEPT SELECT rank, left_id, right_id, merged_id FROM llm_bpe_merges WHERE tokenizer = %(b)s) AS d"""
    return all(db.execute(q, {"a": x, "b": y}).fetchone()[0] == 0 for q in (vocab, merges) for x, y in ((a, b), (b, a)))


def test_gpt2_sizes(db: psycopg.Connection) -> None:
    row = db.execute("SELECT n_vocab, n_merges, byte_ids[1 + 32], byte_ids[1 + 33] FROM llm_tokenizer "
                     "WHERE name = 'gpt2'").fetchone()
    assert row == (50257, 50000, 220, 0)  # byte ' ' is token 220 ('Ġ'), '!' is token 0
    assert db.execute("SELECT id, printable FROM llm_bpe_vocab WHERE tokenizer = 'gpt2' AND special").fetchall() \
        == [(50256, "<|endoftext|>")]


def test_hugging_face_pair_is_identical(db: psycopg.Connection, tmp_path: Path) -> None:
    shutil.copy(GPT2 / "encoder.json", tmp_path / "vocab.json")
    lines = (GPT2 / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    (tmp_path / "merges.txt").write_text("\n".join(lines[1:]), encoding="utf-8")  # without the #version line
    import_files(db, "gpt2-hf", [tmp_path / "merges.txt", tmp_path / "vocab.json"], expect=(50257, 50000))
    assert same_tables(db, "gpt2", "gpt2-hf")


@needs_tiktoken_file
def test_tiktoken_file_is_identical(db: psycopg.Connection) -> None:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    assert load_tiktoken_bpe(str(TIKTOKEN)) == data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(GPT2 / "vocab.bpe"), encoder_json_file=str(GPT2 / "encoder.json"))
    import_files(db, "gpt2-tiktoken", [TIKTOKEN], expect=(50257, 50000))  # merges rebuilt from the ranks
    assert same_tables(db, "gpt2", "gpt2-tiktoken")
    text = "".join(samples().values())
    a, b = db.execute("SELECT llm_encode(%s), llm_encode(%s, tokenizer => 'gpt2-tiktoken')", (text, text)).fetchone()
    assert a == b


def test_trained_tokenizer_side_by_side(db: psycopg.Connection, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(samples().values()), trainer=trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    files = [Path(f) for f in tok.model.save(str(tmp_path))]
    import_files(db, "tiny", files)
    assert db.execute("SELECT n_vocab FROM llm_tokenizer WHERE name = 'tiny'").fetchone()[0] == 700
    client = ClientEncoder(db, "tiny")  # the corpus loader's client-side encoder, over any imported tokenizer
    for doc in build_documents()[:40]:
        got = db.execute("SELECT llm_encode(%s, tokenizer => 'tiny')", (doc,)).fetchone()[0]
        assert got == tok.encode(doc).ids == client.encode(doc).tolist(), doc[:40]
        assert db.execute("SELECT llm_decode(%s::INT[], tokenizer => 'tiny')", (got,)).fetchone()[0] == doc
    assert db.execute("SELECT llm_encode('Hello world')").fetchone()[0] == [15496, 995]  # gpt2 unaffected


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def bad_files(tmp: Path) -> list[tuple[str, list[Path], str]]:
    enc, bpe = (GPT2 / "encoder.json").read_bytes(), (GPT2 / "vocab.bpe").read_text(encoding="utf-8")
    lines = bpe.split("\n")
    good_enc = _write(tmp / "encoder.json", enc)
    swapped = lines[:1] + [lines[40000]] + lines[1:40000] + lines[40001:]
    cases = [
        ("truncated encoder.json", [_write(tmp / "cut.json", enc[:len(enc) // 2]), GPT2 / "vocab.bpe"],
         "not a JSON vocabulary"),
        ("truncated vocab.bpe (whole lines)", [good_enc, _write(tmp / "cut.bpe", "\n".join(lines[:30001]))],
         "built by no merge"),
        ("vocab.bpe cut inside a line", [good_enc, _write(tmp / "cut2.bpe", bpe[:len(bpe) // 2] + "\n")],
         "expected 'left right'|is not in"),
        ("merges out of order", [good_enc, _write(tmp / "swap.bpe", "\n".join(swapped))], "no earlier merge built"),
        ("merges of another tokenizer", [good_enc, _write(tmp / "other.bpe", "#version: 0.2\nq z\nqz x\n")],
         "is not in encoder.json|built by no merge"),
        ("three files", [good_enc, GPT2 / "vocab.bpe", GPT2 / "vocab.bpe"], "give encoder.json"),
        ("missing file", [tmp / "nope.tiktoken"], "no such file"),
    ]
    if TIKTOKEN.exists():
        tk = TIKTOKEN.read_bytes().split(b"\n")
        cases += [
            ("truncated tiktoken (whole lines)", [_write(tmp / "cut.tiktoken", b"\n".join(tk[:40000]) + b"\n")],
             "expected 50257 tokens and 50000 merges"),
            ("tiktoken cut inside a line", [_write(tmp / "cut2.tiktoken", b"\n".join(tk[:40000]) + b"\nIGZ")],
             "not 'base64 rank'"),
        ]
    return cases


def test_bad_files_are_refused_and_change_nothing(db: psycopg.Connection, tmp_path: Path) -> None:
    before = counts(db)
    for what, files, message in bad_files(tmp_path):
        with pytest.raises(TokenizerFileError, match=message):
            import_files(db, "gpt2", files, replace=True)
        assert counts(db) == before, what
    with pytest.raises(TokenizerFileError, match="already exists"):
        import_files(db, "gpt2", [GPT2 / "encoder.json", GPT2 / "vocab.bpe"])
    assert counts(db) == before
    assert db.execute("SELECT llm_encode('Hello world')").fetchone()[0] == [15496, 995]


def test_replace(db: psycopg.Connection) -> None:
    before = db.execute("SELECT llm_encode('replace me please')").fetchone()[0]
    import_files(db, "gpt2", [GPT2 / "encoder.json", GPT2 / "vocab.bpe"], replace=True)
    assert db.execute("SELECT count(*) FROM llm_bpe_cache WHERE tokenizer = 'gpt2'").fetchone()[0] == 0
    assert db.execute("SELECT llm_encode('replace me please')").fetchone()[0] == before


def test_cli(db: psycopg.Connection, dsn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["tokenizer", "import", "--name", "cli", str(GPT2 / "encoder.json"), str(GPT2 / "vocab.bpe"),
                 "--vocab-size", "50257", "--merges", "50000", "--dsn", dsn]) == 0
    assert "imported tokenizer 'cli': 50257 tokens (1 special), 50000 merges" in capsys.readouterr().out
    assert main(["tokenizer", "encode", "Hello world", "--tokenizer", "cli", "--dsn", dsn]) == 0
    assert capsys.readouterr().out == "15496 995\n"
    assert main(["tokenizer", "decode", "15496", "995", "--dsn", dsn]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert main(["tokenizer", "list", "--dsn", dsn]) == 0
    assert "cli\tvocab=50257\tmerges=50000\tspecials=<|endoftext|>" in capsys.readouterr().out
    cut = _write(tmp_path / "cut.bpe", "\n".join((GPT2 / "vocab.bpe").read_text().split("\n")[:100]))
    assert main(["tokenizer", "import", "--name", "cut", str(GPT2 / "encoder.json"), str(cut), "--dsn", dsn]) == 1
    assert "built by no merge" in capsys.readouterr().err
    assert main(["tokenizer", "decode", "99999", "--dsn", dsn]) == 1
    assert "token id 99999 at position 1 is not in tokenizer" in capsys.readouterr().err
