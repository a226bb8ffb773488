"""A database tokenizer as Hugging Face GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), so that `AutoTokenizer.from_pretrained(export_dir)` loads what `pg-llm model export`
wrote and encodes exactly as llm_encode does. Without them transformers silently built an empty tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import psycopg


def write_hf_tokenizer(conn: psycopg.Connection, tokenizer: str, out: Path, n_ctx: int) -> None:
    """Write the four files for database tokenizer `tokenizer` into out."""
    vocab = conn.execute("SELECT printable, id, special FROM llm_bpe_vocab WHERE tokenizer = %s ORDER BY id",
                         (tokenizer,)).fetchall()
    if not vocab:
        raise ValueError(f"tokenizer {tokenizer!r} does not exist: import it with pg-llm tokenizer import")
    printable = {i: p for p, i, _ in vocab}
    merges = conn.execute("SELECT left_id, right_id FROM llm_bpe_merges WHERE tokenizer = %s ORDER BY rank",
                          (tokenizer,)).fetchall()
    specials = [p for p, _, s in vocab if s]
    eos = "<|endoftext|>" if "<|endoftext|>" in specials else (specials[0] if specials else None)
    (out / "vocab.json").write_text(json.dumps({p: i for p, i, _ in vocab}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{printable[a]} {printable[b]}\n"
                                                                for a, b in merges), encoding="utf-8")
    tokens = {"bos_token": eos, "eos_token": eos, "unk_token": eos} if eos else {}
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": n_ctx, "add_prefix_space": False,
        "add_bos_token": False, **tokens}, indent=2) + "\n")
