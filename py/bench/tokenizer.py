"""Tokenizer bench: llm_encode tokens/s (cold and warm BPE cache, one call and one call per document) beside
tiktoken on the same text, llm_decode, and the corpus loader's two encoders.

The text is the Shakespeare corpus from make setup (.pg_llm/assets/shakespeare, 38 plays, ~1.5M tokens),
else the tokenizer tests' diverse text. The cold cache is measured on a bench-only copy of the GPT-2
tokenizer (llm_bench_gpt2, dropped at the end), so a real database's 'gpt2' cache is left alone."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import psycopg

from pg_llm.assets import gpt2_dir
from pg_llm.loader.corpus import shakespeare_dir
from pg_llm.loader.tokenizer import ClientEncoder, ensure_gpt2, import_files

BENCH_TOKENIZER = "llm_bench_gpt2"


def _texts() -> tuple[str, list[str]]:
    plays = sorted(shakespeare_dir().glob("*.txt"))
    if plays:
        return "Shakespeare (38 plays)", [p.read_text(encoding="utf-8") for p in plays]
    tests = Path(__file__).resolve().parent.parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from test_tokenizer_text import build_documents  # noqa: E402 - the tests' text when no corpus was fetched

    return "tokenizer test text", build_documents()


def _timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _row(what: str, tokens: int, chars: int, seconds: float) -> dict:
    return {"encoder": what, "tokens": tokens, "MB": round(chars / 1e6, 2), "seconds": round(seconds, 3),
            "tokens/s": round(tokens / seconds)}


def run(dsn: str) -> list[dict]:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    label, docs = _texts()
    whole = "<|endoftext|>".join(docs)
    chars = len(whole.encode())
    d = gpt2_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(d / "vocab.bpe"),
                                            encoder_json_file=str(d / "encoder.json"))
    ref = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    rows = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET jit = off")
        ensure_gpt2(conn)
        conn.execute("DELETE FROM llm_tokenizer WHERE name = %s", (BENCH_TOKENIZER,))
        import_files(conn, BENCH_TOKENIZER, [d / "encoder.json", d / "vocab.bpe"])
        try:
            q = "SELECT llm_encode(%s, %s)"
            ids, s = _timed(lambda: conn.execute(q, (whole, BENCH_TOKENIZER)).fetchone()[0])
            n = len(ids)
            want = ref.encode(whole, allowed_special="all")
            if ids != want:
                raise AssertionError("llm_encode differs from tiktoken on the bench text")
            pieces = conn.execute("SELECT count(*) FROM llm_bpe_cache WHERE tokenizer = %s",
                                  (BENCH_TOKENIZER,)).fetchone()[0]
            rows.append(_row(f"llm_encode, one call, cold cache ({pieces} pieces BPE'd)", n, chars, s))
            _, s = _timed(lambda: conn.execute(q, (whole, BENCH_TOKENIZER)).fetchone()[0])
            rows.append(_row("llm_encode, one call, warm cache", n, chars, s))
            _, s = _timed(lambda: [conn.execute(q, (t, BENCH_TOKENIZER)).fetchone() for t in docs])
            rows.append(_row(f"llm_encode, one call per document ({len(docs)}), warm cache", n, chars, s))
            _, s = _timed(lambda: conn.execute("SELECT llm_decode(%s::INT[], %s)", (ids, BENCH_TOKENIZER)).fetchone())
            rows.append({**_row("llm_decode (tokens/s decoded)", n, chars, s), "encoder": "llm_decode"})
            client = ClientEncoder(conn, BENCH_TOKENIZER)
            _, s = _timed(lambda: client.encode(whole))
            rows.append(_row("pg-llm corpus load --encoder client (tiktoken over the db vocabulary)", n, chars, s))
            _, s = _timed(lambda: ref.encode(whole, allowed_special="all"))
            rows.append(_row("tiktoken (reference, Rust)", n, chars, s))
        finally:
            conn.execute("DELETE FROM llm_tokenizer WHERE name = %s", (BENCH_TOKENIZER,))
    return [{"title": f"Tokenizer: GPT-2 encode on {label}, tokens/s", "rows": rows,
             "notes": ["identical ids checked against tiktoken before timing the rest",
                       "cold cache: every distinct pre-token BPE'd in SQL (one recursive query); warm: cache hits"]}]


if __name__ == "__main__":
    for table in run(sys.argv[1]):
        print(table["title"])
        for r in table["rows"]:
            print(r)
