"""llm_encode / llm_decode against the reference tokenizers (tiktoken, and Hugging Face tokenizers), token for
token: known values, > 200 KB of diverse text (test_tokenizer_text.py), hypothesis on random Unicode and
whitespace-heavy strings, random token sequences (invalid UTF-8 -> U+FFFD like Python), errors, the cache."""
from __future__ import annotations

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_llm.api import tokenizer_classes as tc
from pg_llm.assets import gpt2_dir

from helpers import tiktoken_gpt2
from test_tokenizer_text import EDGE, build_documents, samples

EOT = 50256
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def ref():
    return tiktoken_gpt2()


@pytest.fixture(scope="module")
def hf():
    from transformers import GPT2TokenizerFast

    d = gpt2_dir()
    tok = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    assert len(tok) == 50257  # the old vocab_file= keyword would silently give an empty tokenizer
    return tok


def encode(db: psycopg.Connection, text: str) -> list[int]:
    return db.execute("SELECT llm_encode(%s)", (text,)).fetchone()[0]


def decode(db: psycopg.Connection, ids: list[int]) -> str:
    return db.execute("SELECT llm_decode(%s::INT[])", (ids,)).fetchone()[0]


def ref_encode(ref, text: str) -> list[int]:
    return ref.encode(text, allowed_special="all")


def first_difference(ref, got: list[int], want: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return (f"token {i}: got {got[i:i + 4]} {ref.decode(got[max(0, i - 2):i + 4])!r}, want {want[i:i + 4]} "
            f"{ref.decode(want[max(0, i - 2):i + 4])!r}")


def test_known_values(db: psycopg.Connection) -> None:
    assert encode(db, "Hello world") == [15496, 995]
    assert encode(db, " the") == [262]
    assert encode(db, "<|endoftext|>") == [EOT]
    assert encode(db, "") == []
    assert db.execute("SELECT llm_encode('Hello world', tokenizer => 'gpt2')").fetchone()[0] == [15496, 995]
    assert decode(db, [15496, 995]) == "Hello world"
    assert decode(db, []) == ""
    assert db.execute("SELECT llm_encode(NULL), llm_decode(NULL)").fetchone() == (None, None)
    rows = db.execute("SELECT pos, id, printable, piece FROM llm_tokenize(' the cat')").fetchall()
    assert rows == [(1, 262, "Ġthe", " the"), (2, 3797, "Ġcat", " cat")]


def test_diverse_text_equals_reference(db: psycopg.Connection, ref, hf) -> None:
    docs = build_documents()
    total = sum(len(d.encode()) for d in docs)
    assert total >= 200_000
    db.execute("SELECT llm_bpe_cache_clear()")
    tokens = 0
    for d in docs:
        got, want = encode(db, d), ref_encode(ref, d)
        assert got == want, f"document {d[:40]!r}: {first_difference(ref, got, want)}"
        assert hf(d)["input_ids"] == want
        assert decode(db, got) == d
        tokens += len(got)
    print(f"{total / 1000:.0f} KB, {len(docs)} documents, {tokens} tokens: 100% equal to tiktoken and tokenizers")


def test_whole_samples_in_one_call(db: psycopg.Connection, ref) -> None:
    text = "<|endoftext|>".join(list(samples().values()) + EDGE)
    assert encode(db, text) == ref_encode(ref, text)


def test_long_pieces_are_exact_and_not_cached(db: psycopg.Connection, ref) -> None:
    cases = ["a" * 600, " " * 1000 + "x", "\n" * 300, "abcdefghij" * 30, "1234567890" * 40, "é" * 128,
             "x" * 254, "x" * 255, "x" * 256, "!?" * 200, " " + "日本" * 100]
    for text in cases:
        assert encode(db, text) == ref_encode(ref, text), text[:20]
        assert decode(db, encode(db, text)) == text
    longest = db.execute("SELECT max(octet_length(piece)) FROM llm_bpe_cache").fetchone()[0]
    assert longest <= 255


def test_cache_fills_and_clears(db: psycopg.Connection, ref) -> None:
    word = " Zyxwvutsrqponmlkjihgfedcba"
    db.execute("SELECT llm_bpe_cache_clear('gpt2')")
    assert encode(db, word) == ref_encode(ref, word)
    cached = db.execute("SELECT ids FROM llm_bpe_cache WHERE tokenizer = 'gpt2' AND piece = %s", (word,)).fetchone()
    assert cached and cached[0] == ref_encode(ref, word)
    assert db.execute("SELECT llm_bpe_cache_clear()").fetchone()[0] >= 1
    assert encode(db, word) == ref_encode(ref, word)


def test_decode_errors(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match=r"token id 50257 at position 2 is not in tokenizer "
                       r'"gpt2" \(ids 0 to 50256\)'):
        decode(db, [15496, 50257])
    with pytest.raises(psycopg.errors.RaiseException, match="token id -1 at position 1"):
        decode(db, [-1])
    with pytest.raises(psycopg.errors.RaiseException, match="token id NULL at position 2"):
        db.execute("SELECT llm_decode(ARRAY[1, NULL]::INT[])")
    with pytest.raises(psycopg.errors.RaiseException, match='tokenizer "nope" does not exist') as e:
        db.execute("SELECT llm_encode('x', tokenizer => 'nope')")
    assert "pg-llm tokenizer import" in (e.value.diag.message_hint or "")


def test_invalid_utf8_decodes_like_python(db: psycopg.Connection, ref) -> None:
    cases = [[10545], [10545, 245], [10545, 245, 98], [447, 247], [447], [245, 447], [188], [128, 129, 188, 220]]
    for ids in cases:
        want = ref.decode(ids).replace("\x00", "\ufffd")
        assert decode(db, ids) == want, ids
        assert bytes(db.execute("SELECT llm_decode_bytes(%s::INT[])", (ids,)).fetchone()[0]) == ref.decode_bytes(ids)


def test_unicode_classes_match_the_reference() -> None:
    """tokenizer_unicode.py is what tiktoken's regex engine calls \\p{L}, \\p{N}, \\s (else: refresh it)."""
    assert tc._probe(r"\p{L}") == tc.LETTERS
    assert tc._probe(r"\p{N}") == tc.NUMBERS
    assert tc._probe(r"\s") == tc.SPACES


def test_postgres_reads_the_classes_as_written(db: psycopg.Connection) -> None:
    assert db.execute("SELECT llm_bpe_pattern('gpt2')").fetchone()[0] == tc.pg_pattern()
    chars = "".join(chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF)
    for ranges in (tc.LETTERS, tc.NUMBERS, tc.SPACES):
        want = "".join(chr(c) for a, b in ranges for c in range(a, b + 1))
        got = db.execute("SELECT string_agg(m[1], '') FROM regexp_matches(%s, %s, 'g') AS m",
                         (chars, f"[{tc.bracket_body(ranges)}]")).fetchone()[0]
        assert got == want


# ---- properties ------------------------------------------------------------------------------------------

chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # text never holds NUL
any_text = st.text(alphabet=chars, max_size=80)
long_text = st.text(alphabet=chars, min_size=80, max_size=400)
spacey = st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u200a\u2028\u2029"
                                               "\u202f\u205f\u3000\u200b\ufeff") + list("aZé1١'.-日🎉")), max_size=60)
fragments = st.lists(st.sampled_from(sorted(set(" ".join(samples().values()).split(" ")))[:4000] + EDGE
                                     + ["<|endoftext|>", "'s", "'LL", " ", "  ", "\n", "\r\n", "\t"]),
                     max_size=25).map(lambda parts: "".join(parts).replace("\x00", ""))  # text never holds NUL


@settings(HYPO, max_examples=500)
@given(text=st.one_of(any_text, spacey, fragments, long_text))
def test_property_encode_equals_reference(db: psycopg.Connection, ref, text: str) -> None:
    got, want = encode(db, text), ref_encode(ref, text)
    assert got == want, first_difference(ref, got, want)
    assert decode(db, got) == text


@HYPO
@given(ids=st.lists(st.one_of(st.integers(0, EOT), st.sampled_from([188, 10545, 245, 447, 247, 98, 220, EOT])),
                    max_size=30))
def test_property_decode_equals_reference(db: psycopg.Connection, ref, ids: list[int]) -> None:
    assert decode(db, ids) == ref.decode(ids).replace("\x00", "\ufffd")


@HYPO
@given(data=st.binary(max_size=40))
def test_property_lossy_utf8_equals_python(db: psycopg.Connection, data: bytes) -> None:
    got = db.execute("SELECT llm_internal.llm_utf8_text(%s)", (data,)).fetchone()[0]
    assert got == data.decode("utf-8", "replace").replace("\x00", "\ufffd")
