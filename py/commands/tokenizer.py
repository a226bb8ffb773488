"""pg-llm tokenizer import|list|encode|decode|fetch: byte-level BPE tokenizers in the database.

  pg-llm tokenizer import --name gpt2 .pg_llm/assets/gpt2/encoder.json .pg_llm/assets/gpt2/vocab.bpe
  pg-llm tokenizer import --name gpt2-hf vocab.json merges.txt          # Hugging Face pair
  pg-llm tokenizer import --name r50k gpt2.tiktoken                      # tiktoken ranks file
  pg-llm tokenizer encode "Hello world"                                 # -> 15496 995
  pg-llm tokenizer decode 15496 995                                     # -> Hello world
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

from pg_llm.commands.db import dsn_argument, resolve_dsn
from pg_llm.loader.tokenizer import DEFAULT_SPECIALS, fetch_tiktoken_gpt2, import_files


def _import(args: argparse.Namespace) -> int:
    expect = None
    if args.vocab_size is not None or args.merges is not None:
        if args.vocab_size is None or args.merges is None:
            raise SystemExit("pg-llm: error: give both --vocab-size and --merges")
        expect = (args.vocab_size, args.merges)
    specials = tuple(args.special) if args.special else DEFAULT_SPECIALS
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        v = import_files(conn, args.name, [Path(f) for f in args.files], replace=args.replace, specials=specials,
                         expect=expect)
    print(f"imported tokenizer {args.name!r}: {len(v.tokens)} tokens ({len(v.special)} special), "
          f"{len(v.merges)} merges from {v.source}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        rows = conn.execute("SELECT name, n_vocab, n_merges, specials, cached_pieces, source FROM llm_tokenizers "
                            "ORDER BY name").fetchall()
    if not rows:
        print("no tokenizers (pg-llm tokenizer import --name NAME FILES)")
    for name, n_vocab, n_merges, specials, cached, source in rows:
        print(f"{name}\tvocab={n_vocab}\tmerges={n_merges}\tspecials={','.join(specials or [])}\t"
              f"cached_pieces={cached}\t{source}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        ids = conn.execute("SELECT llm_encode(%s, %s)", (text, args.tokenizer)).fetchone()[0]
    print(" ".join(map(str, ids)))
    return 0


def _decode(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        text = conn.execute("SELECT llm_decode(%s, %s)", (args.ids, args.tokenizer)).fetchone()[0]
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    print(f"[setup] GPT-2 ranks (tiktoken format) in {fetch_tiktoken_gpt2()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="import byte-level BPE tokenizers (GPT-2), encode/decode text",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    s = tsub.add_parser("import", help="import encoder.json + vocab.bpe, vocab.json + merges.txt or a .tiktoken file",
                        description="Import a byte-level BPE tokenizer in one transaction. The files are checked "
                        "first (ids, bytes, merges, sizes: GPT-2 under the name gpt2 must have 50257 tokens and "
                        "50000 merges); mismatched or truncated files are refused and nothing changes.")
    s.add_argument("--name", required=True, help="tokenizer name (llm_tokenizer.name; llm_encode(..., tokenizer => "
                   "NAME))")
    s.add_argument("files", nargs="+", metavar="FILE", help="encoder.json vocab.bpe | vocab.json merges.txt | "
                   "ranks.tiktoken (client-side paths)")
    s.add_argument("--special", action="append", metavar="TOKEN", help="a special token (repeatable; default "
                   "<|endoftext|>): matched as text by llm_encode, never BPE'd. tiktoken files get them after the "
                   "last rank")
    s.add_argument("--vocab-size", type=int, default=None, help="expected number of tokens (with --merges)")
    s.add_argument("--merges", type=int, default=None, help="expected number of merges (with --vocab-size)")
    s.add_argument("--replace", action="store_true", help="replace an existing tokenizer of that name")
    dsn_argument(s)
    s.set_defaults(func=_import)

    s = tsub.add_parser("list", help="imported tokenizers")
    dsn_argument(s)
    s.set_defaults(func=_list)

    s = tsub.add_parser("encode", help="print the token ids of TEXT ('-': stdin), computed by llm_encode")
    s.add_argument("text", metavar="TEXT")
    s.add_argument("--tokenizer", default="gpt2")
    dsn_argument(s)
    s.set_defaults(func=_encode)

    s = tsub.add_parser("decode", help="print the text of token IDS, computed by llm_decode")
    s.add_argument("ids", metavar="ID", nargs="+", type=int)
    s.add_argument("--tokenizer", default="gpt2")
    dsn_argument(s)
    s.set_defaults(func=_decode)

    s = tsub.add_parser("fetch", help="download GPT-2's ranks file (gpt2.tiktoken, from the openai-whisper sdist on "
                        "PyPI, sha256-checked) into .pg_llm/assets/gpt2 (make setup runs this)")
    s.set_defaults(func=_fetch)
