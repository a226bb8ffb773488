"""Tiny GPT-2 checkpoints built offline with transformers (no hub here), imported with pg_llm's loader."""
from __future__ import annotations

import os
from pathlib import Path

import psycopg
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(n_embd=48, n_head=3, n_layer=2, n_positions=37, vocab_size=301,  # not multiples of the tile
            bos_token_id=300, eos_token_id=300)


def make_hf_model(path: Path, seed: int = 0, **overrides: int | bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initializes biases and LayerNorm to 0/1: perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def import_tiny(conn: psycopg.Connection, tmp: Path, name: str, seed: int = 0, **overrides: int | bool):
    from pg_llm.loader.model import import_model

    model = make_hf_model(tmp / name, seed, **overrides)
    import_model(conn, tmp / name, name, replace=True)
    return model
