"""Import byte-level BPE tokenizers into llm_tokenizer / llm_bpe_vocab / llm_bpe_merges.

Three formats, detected from the files given:
- OpenAI's pair encoder.json + vocab.bpe, or Hugging Face's vocab.json + merges.txt (the same formats:
  a JSON map from the byte-level "printable" form of each token to its id, and one merge "left right" a
  line in rank order, optionally after a "#version" line);
- a tiktoken ranks file (one "base64(token bytes) rank" a line, e.g. gpt2.tiktoken). It has no merges
  and no special tokens: merges are rebuilt from the ranks (for each multi-byte token in rank order, BPE
  its bytes with the lower-ranked merges only; that always stops at two parts, which are its merge) and
  the special tokens (default <|endoftext|>) get the ids after the last rank.
Everything is checked before anything is written (sizes, ids, bytes, merges) and written in one
transaction."""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from pg_llm.assets import gpt2_dir, pip_download

DEFAULT_SPECIALS = ("<|endoftext|>",)
KNOWN_SIZES = {"gpt2": (50257, 50000)}  # (tokens, merges) checked when importing under these names


class TokenizerFileError(ValueError):
    pass


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the other 68 bytes
    to U+0100 onwards, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def printable(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


@dataclass
class Vocab:
    """A byte-level BPE tokenizer: token bytes by id, special ids, merges (left, right, merged) by rank."""
    tokens: list[bytes]
    special: set[int]
    merges: list[tuple[int, int, int]]
    source: str = ""
    printables: dict[int, str] = field(default_factory=dict)

    def printable(self, i: int) -> str:
        if i in self.printables:
            return self.printables[i]
        return self.tokens[i].decode("utf-8", "replace") if i in self.special else printable(self.tokens[i])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _unprintable(text: str, what: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise TokenizerFileError(f"{what}: {text!r} contains {e.args[0]!r}, not a byte-level BPE character") from None


def read_pair(vocab_path: Path, merges_path: Path, specials: tuple[str, ...] = DEFAULT_SPECIALS) -> Vocab:
    """OpenAI encoder.json + vocab.bpe, or Hugging Face vocab.json + merges.txt."""
    try:
        table = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"{vocab_path}: not a JSON vocabulary (truncated?): {e}") from None
    if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
        raise TokenizerFileError(f"{vocab_path}: expected a JSON object mapping token -> integer id")
    n = len(table)
    ids = sorted(table.values())
    if ids != list(range(n)):
        missing = sorted(set(range(n)) - set(ids))[:5]
        raise TokenizerFileError(f"{vocab_path}: ids must be 0..{n - 1} without gaps or duplicates "
                                 f"(missing e.g. {missing})")
    tokens: list[bytes] = [b""] * n
    special: set[int] = set()
    printables: dict[int, str] = {}
    for text, i in table.items():
        if text in specials:
            tokens[i] = text.encode("utf-8")
            special.add(i)
        else:
            tokens[i] = _unprintable(text, f"{vocab_path}: token {i}")
        printables[i] = text
    by_text = table
    merges = []
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    for lineno, line in enumerate(lines, 1):
        if (lineno == 1 and line.startswith("#version")) or (line == "" and lineno == len(lines)):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFileError(f"{merges_path}:{lineno}: expected 'left right', got {line!r} (truncated?)")
        left, right = parts
        for p in parts:
            if p not in by_text:
                raise TokenizerFileError(f"{merges_path}:{lineno}: {p!r} is not in {vocab_path.name}")
        if left + right not in by_text:
            raise TokenizerFileError(f"{merges_path}:{lineno}: merged token {left + right!r} is not in "
                                     f"{vocab_path.name}")
        merges.append((by_text[left], by_text[right], by_text[left + right]))
    source = f"{vocab_path.name} sha256:{_sha(vocab_path)} + {merges_path.name} sha256:{_sha(merges_path)}"
    return Vocab(tokens, special, merges, source, printables)


def read_tiktoken(path: Path, specials: tuple[str, ...] = DEFAULT_SPECIALS) -> Vocab:
    """A tiktoken ranks file; merges are rebuilt from the ranks, specials appended after the last rank."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("two fields expected")
            tok, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError as e:
            raise TokenizerFileError(f"{path}:{lineno}: not 'base64 rank' ({e}); truncated file?") from None
        if tok in ranks:
            raise TokenizerFileError(f"{path}:{lineno}: token {tok!r} appears twice")
        ranks[tok] = rank
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerFileError(f"{path}: ranks must be 0..{n - 1} without gaps or duplicates")
    tokens = [b""] * n
    for tok, r in ranks.items():
        tokens[r] = tok
    merges = []
    for r, tok in enumerate(tokens):
        if len(tok) < 2:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, at = r, -1
            for i in range(len(parts) - 1):
                pr = ranks.get(parts[i] + parts[i + 1])
                if pr is not None and pr < best:
                    best, at = pr, i
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2 or parts[0] not in ranks or parts[1] not in ranks:
            raise TokenizerFileError(f"{path}: token of rank {r} ({printable(tok)!r}) cannot be built from two "
                                     "lower-ranked tokens: not a BPE ranks file")
        merges.append((ranks[parts[0]], ranks[parts[1]], r))
    special = set()
    for s in specials:
        tokens.append(s.encode("utf-8"))
        special.add(len(tokens) - 1)
    return Vocab(tokens, special, merges, f"{path.name} sha256:{_sha(path)}")


def read_files(files: list[Path], specials: tuple[str, ...] = DEFAULT_SPECIALS) -> Vocab:
    """Detect the format from the files: one JSON vocabulary + one merges file, or one tiktoken file."""
    for f in files:
        if not f.is_file():
            raise TokenizerFileError(f"{f}: no such file")
    if len(files) == 1:
        return read_tiktoken(files[0], specials)
    if len(files) == 2:
        js = [f for f in files if f.suffix == ".json"]
        if len(js) == 1:
            other = files[1] if files[0] == js[0] else files[0]
            return read_pair(js[0], other, specials)
    raise TokenizerFileError("give encoder.json + vocab.bpe (OpenAI), vocab.json + merges.txt (Hugging Face) "
                             "or one tiktoken ranks file")


def validate(v: Vocab, expect: tuple[int, int] | None = None) -> None:
    """Refuse inconsistent or truncated tokenizers: every byte is a token, every merge builds a token from
    two tokens that already exist, every other token is built by exactly one merge or is special."""
    seen: dict[bytes, int] = {}
    for i, t in enumerate(v.tokens):
        if not t:
            raise TokenizerFileError(f"token {i} is empty")
        if t in seen:
            raise TokenizerFileError(f"tokens {seen[t]} and {i} have the same bytes {printable(t)!r}")
        seen[t] = i
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise TokenizerFileError(f"{len(missing)} of the 256 single bytes are not tokens (e.g. byte {missing[0]})")
    built = {seen[bytes([b])] for b in range(256)}
    for rank, (a, b, m) in enumerate(v.merges):
        if a not in built or b not in built:
            raise TokenizerFileError(f"merge {rank} ({v.printable(a)!r} {v.printable(b)!r}) uses a token that no "
                                     "earlier merge built")
        if v.tokens[a] + v.tokens[b] != v.tokens[m] or m in built or m in v.special:
            raise TokenizerFileError(f"merge {rank} does not build a new token {v.printable(m)!r}")
        built.add(m)
    orphans = [i for i in range(len(v.tokens)) if i not in built and i not in v.special]
    if orphans:
        raise TokenizerFileError(f"{len(orphans)} tokens are built by no merge (e.g. id {orphans[0]} "
                                 f"{v.printable(orphans[0])!r}): merges file truncated, or a special token "
                                 "not declared with --special")
    if expect and (len(v.tokens), len(v.merges)) != expect:
        raise TokenizerFileError(f"expected {expect[0]} tokens and {expect[1]} merges, got {len(v.tokens)} tokens "
                                 f"and {len(v.merges)} merges: wrong or truncated files")


def special_regex(specials: list[str]) -> str | None:
    """An ARE alternation matching the special tokens literally (every character a \\u / \\U escape)."""
    if not specials:
        return None
    esc = ["".join("\\u%04X" % ord(c) if ord(c) <= 0xFFFF else "\\U%08X" % ord(c) for c in s)
           for s in sorted(specials, key=lambda s: (-len(s), s))]
    return "|".join(esc)


def exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM llm_tokenizer WHERE name = %s", (name,)).fetchone() is not None


def write(conn: psycopg.Connection, name: str, v: Vocab, replace: bool = False) -> None:
    """Insert a validated tokenizer in one transaction (replacing an existing one only when asked)."""
    index = {t: i for i, t in enumerate(v.tokens)}
    byte_ids = [index[bytes([b])] for b in range(256)]
    with conn.transaction():
        if exists(conn, name):
            if not replace:
                raise TokenizerFileError(f"tokenizer {name!r} already exists (use --replace to overwrite it)")
            conn.execute("DELETE FROM llm_tokenizer WHERE name = %s", (name,))
        specials = [v.tokens[i].decode("utf-8") for i in sorted(v.special)]
        conn.execute("INSERT INTO llm_tokenizer (name, n_vocab, n_merges, byte_ids, special_re, source) "
                     "VALUES (%s, %s, %s, %s, %s, %s)",
                     (name, len(v.tokens), len(v.merges), byte_ids, special_regex(specials), v.source))
        with conn.cursor() as cur:
            with cur.copy("COPY llm_bpe_vocab (tokenizer, id, token, printable, special) FROM STDIN "
                          "(FORMAT BINARY)") as cp:
                cp.set_types(["text", "int4", "bytea", "text", "bool"])
                for i, t in enumerate(v.tokens):
                    cp.write_row((name, i, t, v.printable(i), i in v.special))
            with cur.copy("COPY llm_bpe_merges (tokenizer, rank, left_id, right_id, merged_id) FROM STDIN "
                          "(FORMAT BINARY)") as cp:
                cp.set_types(["text", "int4", "int4", "int4", "int4"])
                for r, (a, b, m) in enumerate(v.merges):
                    cp.write_row((name, r, a, b, m))


def import_files(conn: psycopg.Connection, name: str, files: list[Path], *, replace: bool = False,
                 specials: tuple[str, ...] = DEFAULT_SPECIALS, expect: tuple[int, int] | None = None) -> Vocab:
    """Read, check and import a tokenizer; nothing is written when any check fails."""
    v = read_files([Path(f) for f in files], specials)
    validate(v, expect or KNOWN_SIZES.get(name))
    write(conn, name, v, replace)
    return v


def ensure_gpt2(conn: psycopg.Connection) -> None:
    """Import the 'gpt2' tokenizer from .pg_llm/assets/gpt2 (make setup) when the database lacks it."""
    if exists(conn, "gpt2"):
        return
    d = gpt2_dir()
    files = [d / "encoder.json", d / "vocab.bpe"]
    if not all(f.exists() for f in files):
        raise TokenizerFileError(f"GPT-2 tokenizer files are missing in {d}: run make setup")
    import_files(conn, "gpt2", files)


# ---- client-side reference encoder (tiktoken over the database's vocabulary) ----------------------------

# tiktoken's form of GPT-2's pattern (possessive quantifiers; the same splits as the original).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class ClientEncoder:
    """Encode on the client with tiktoken, from the tokenizer tables of the database (so it is the same
    tokenizer as llm_encode's). tiktoken merges the adjacent pair whose concatenation has the lowest rank;
    ranks are the merge ranks (bytes first), which is GPT-2's merge order; ids are mapped back."""

    def __init__(self, conn: psycopg.Connection, name: str = "gpt2") -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise RuntimeError("client-side encoding needs tiktoken (pip install tiktoken), or encode in the "
                               "database with --encoder sql") from e
        import numpy as np

        pre = conn.execute("SELECT pretokenizer FROM llm_tokenizer WHERE name = %s", (name,)).fetchone()
        if pre is None:
            raise TokenizerFileError(f"tokenizer {name!r} does not exist (pg-llm tokenizer import --name {name} ...)")
        vocab = conn.execute("SELECT id, token, special FROM llm_bpe_vocab WHERE tokenizer = %s", (name,)).fetchall()
        merged = dict(conn.execute("SELECT merged_id, rank FROM llm_bpe_merges WHERE tokenizer = %s",
                                   (name,)).fetchall())
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        rank_to_id = np.zeros(len(vocab), dtype=np.int32)
        n_bytes = 0
        for i, tok, special in sorted(vocab):  # single bytes get ranks 0..255 in id order, merges 256 + rank
            if special:
                continue
            r = 256 + merged[i] if i in merged else n_bytes
            n_bytes += i not in merged
            ranks[bytes(tok)] = r
            rank_to_id[r] = i
        for i, tok, special in vocab:
            if special:
                r = len(ranks) + len(specials)
                specials[bytes(tok).decode("utf-8")] = r
                rank_to_id[r] = i
        self.name = name
        self.rank_to_id = rank_to_id
        self.encoding = tiktoken.Encoding(f"pg_llm:{name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=specials)

    def encode(self, text: str):  # -> np.ndarray (int32 ids)
        import numpy as np

        ranks = self.encoding.encode(text, allowed_special="all")
        return self.rank_to_id[np.asarray(ranks, dtype=np.int64)] if ranks else np.zeros(0, np.int32)


# ---- the GPT-2 ranks file in tiktoken format (test reference and import-format check) --------------------

WHISPER_SDIST = "openai-whisper==20250625"
TIKTOKEN_GPT2 = ("gpt2.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")


def fetch_tiktoken_gpt2() -> Path:
    """.pg_llm/assets/gpt2/gpt2.tiktoken from the openai-whisper source archive on PyPI (sha256-checked;
    whisper itself is not installed)."""
    import tarfile
    import tempfile

    name, want = TIKTOKEN_GPT2
    out = gpt2_dir() / name
    if out.exists() and hashlib.sha256(out.read_bytes()).hexdigest() == want:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip_download(["--no-binary", ":all:", WHISPER_SDIST], tmp)
        sdist = next(Path(tmp).glob("openai_whisper-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/whisper/assets/" + name)), None)
            f = tar.extractfile(member) if member else None
            if f is None:
                raise TokenizerFileError(f"{sdist.name} has no whisper/assets/{name}")
            data = f.read()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise TokenizerFileError(f"sha256 mismatch for {name} from {WHISPER_SDIST}: got {got}, expected {want}")
    out.write_bytes(data)
    return out
