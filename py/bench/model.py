"""Bench section `model`: generation against transformers `generate` (KV cache on both sides), same run.

Seeded random transformers GPT2LMHeadModel checkpoints (GPT-2 small, and a 2-layer 64-wide model over GPT-2's
vocabulary) are imported once (dropped at the end). For each case pg_llm runs `SELECT llm_generate_tokens(...)`
(the user's call: one fused llm_mk_gpt2_generate call, ops/decode.py) and transformers runs
model.generate(..., max_new_tokens=N, min_new_tokens=N) with torch.set_num_threads(the server's BLAS threads):
- warm: the same session again (weights in the backend's weight cache), interleaved with transformers;
- cold: the first call of a new session (PL/Python and numpy start, every weight read from its tiles);
- greedy tokens are compared with transformers' (equal = token for token);
- per token: (time of N new tokens - time of 1) / (N - 1), the cost of a decoding step without the prefill.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pg_llm.bench import Context, Table, Timed, server_setup_sql

NEW = 64
CASES = (("gpt2-small", {}, 16, 0.0), ("gpt2-small", {}, 16, 0.8), ("gpt2-small", {}, 512, 0.0),
         ("tiny-2x64", {"n_layer": 2, "n_head": 2, "n_embd": 64}, 16, 0.0))
SQL = "SELECT llm_generate_tokens(%s, %s, max_new_tokens => %s, temperature => %s, top_k => %s, seed => 1)"


def _import(ctx: Context, name: str, overrides: dict[str, int]) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pg_llm.loader.model import import_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**overrides)).eval()
    model.generation_config.eos_token_id = None  # pg_llm's default: no stop at <|endoftext|>
    with tempfile.TemporaryDirectory(prefix="pg_llm_bench_gen_") as tmp:
        model.save_pretrained(tmp)
        r = import_model(ctx.conn, Path(tmp), f"{ctx.model}_{name}", replace=True)
    ctx.log(f"model: imported {name} ({r.params / 1e6:.1f}M parameters) in {r.seconds:.0f} s")
    return model


def _hf(model: Any, prompt: list[int], new: int, temperature: float) -> list[int]:
    import torch

    kw: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_k": 40} if temperature else \
        {"do_sample": False}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                             use_cache=True, **kw)
    return out[0].tolist()


def run(ctx: Context) -> list[Table]:
    import torch

    ctx.conn.execute(server_setup_sql(ctx.schema))
    server = json.loads(ctx.conn.execute(f"SELECT {ctx.schema}.blas(0)").fetchone()[0])
    threads = int(server.get("threads") or 1)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    t = Table(f"Generation: llm_generate_tokens vs transformers generate ({NEW} new tokens, KV cache)",
              ["model", "prompt", "sampling", "pg warm tok/s", "transformers tok/s", "ratio", "pg cold s",
               "pg warm s", "cold - warm s", "pg ms/token", "hf ms/token", "greedy equal"])
    models: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    try:
        for name, overrides, prefix, temp in CASES:
            if name not in models:
                models[name] = _import(ctx, name, overrides)
            model, pg = models[name], f"{ctx.model}_{name}"
            prompt = rng.integers(0, 50257, prefix).tolist()
            top_k = 40 if temp else 0
            colds = []
            for _ in range(2):  # a new session each: PL/Python boot, the weights read from their tiles
                with ctx.connect() as cold:
                    t0 = time.perf_counter()
                    first = cold.execute(SQL, (pg, prompt, NEW, temp, top_k)).fetchone()[0]
                    colds.append(time.perf_counter() - t0)
            cold_s = statistics.median(colds)

            def pg_run(n: int = NEW) -> list[int]:
                return ctx.conn.execute(SQL, (pg, prompt, n, temp, top_k)).fetchone()[0]  # noqa: B023

            pg_run(1)
            st = ctx.compare({"pg": Timed(pg_run), "hf": Timed(lambda: _hf(model, prompt, NEW, temp)),  # noqa: B023
                              "pg1": Timed(lambda: pg_run(1)),
                              "hf1": Timed(lambda: _hf(model, prompt, 1, temp))}, runs=3)  # noqa: B023
            equal = "-" if temp else ("yes" if pg_run() == _hf(model, prompt, NEW, 0.0) == first else "NO")
            pg_s, hf_s = st["pg"].median, st["hf"].median
            t.add(name, prefix, f"T={temp}, top_k={top_k}" if temp else "greedy", NEW / pg_s, NEW / hf_s,
                  f"{hf_s / pg_s:.2f}x", cold_s, pg_s, cold_s - pg_s, (pg_s - st["pg1"].median) / (NEW - 1) * 1e3,
                  (hf_s - st["hf1"].median) / (NEW - 1) * 1e3, equal)
    finally:
        torch.set_num_threads(saved)
        for name in models:
            ctx.conn.execute("SELECT llm_model_drop(%s, TRUE)", (f"{ctx.model}_{name}",))
    t.notes.append(f"ratio = transformers s / pg_llm s (above 1: pg_llm faster); medians of 3 interleaved runs; "
                   f"torch with {threads} thread(s), the server's OpenBLAS threads.")
    t.notes.append("cold = a new connection's first llm_generate_tokens (PL/Python boot, numpy import, the weights "
                   "read from llm_tile into the backend's weight cache), median of 2 new sessions; the first "
                   "after the import also waits for the import's pages to be written out.")
    return [t]
