"""Bench section `model`: GPT-2 small (random weights) generation speed with the KV cache at two prefix lengths.

A seeded transformers GPT2LMHeadModel(GPT2Config()) is written to a temporary directory and imported once as
the model `ctx.model` (dropped at the end). Each measurement prefills a random prompt of `prefix` tokens into
the per-layer caches (llm_gpt2_forward_cached), then times decoding steps one by one from the client, each
exactly what llm_generate_steps does per token: a one-row cached forward, greedy sampling of the logits row
(llm_mk_sample) and the release of the step's activations. With the cache a step reads every weight once
plus 8 * C bytes per cached position and layer, so ms/token should barely move from prefix 16 to 512; without
it (use_cache => false) a step is a forward of the whole sequence.

Slow (about 3 minutes, 1.5 with --quick), so opt-in: it runs with `--only model` or PG_LLM_BENCH_MODEL=1 and
otherwise prints a one-line table saying how to run it (OPTIONAL marks it for a framework that knows the flag).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pg_llm.bench import Context, Table

OPTIONAL = True
PREFIXES = (16, 512)
STEP = """
    SELECT llm_internal.llm_mk_sample((SELECT string_agg(t.data, ''::BYTEA ORDER BY t.tr, t.tc) FROM llm_tile AS t
                          WHERE t.tensor_id = %(logits)s), 0, 0, 1.0, 0, %(step)s)"""


def _import(ctx: Context) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pg_llm.loader.model import import_model

    ctx.log("model: building a random GPT-2 small checkpoint (seed 0)")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    with tempfile.TemporaryDirectory(prefix="pg_llm_bench_gpt2_") as tmp:
        model.save_pretrained(tmp)
        del model
        r = import_model(ctx.conn, Path(tmp), ctx.model, replace=True)
    ctx.log(f"model: imported {r.params / 1e6:.0f}M parameters as {ctx.model!r} in {r.seconds:.0f} s")


def _decode(ctx: Context, prompt: list[int], steps: int, use_cache: bool) -> tuple[float | None, list[float]]:
    """(prefill seconds or None, seconds of each decoding step)."""
    conn = ctx.conn
    mark = conn.execute("SELECT llm_scratch_mark()").fetchone()[0]
    try:
        seq, prefill, times = list(prompt), None, []
        caches = (conn.execute("SELECT llm_internal.llm_kv_cache_create(%s)", (ctx.model,)).fetchone()[0]
                  if use_cache else None)
        for i in range(steps + (1 if use_cache else 0)):
            t0 = time.perf_counter()
            step_mark = conn.execute("SELECT llm_scratch_mark()").fetchone()[0]
            if use_cache:
                new = seq if i == 0 else seq[-1:]
                logits = conn.execute("SELECT llm_internal.llm_gpt2_forward_cached(%s, %s, %s, %s)",
                                      (ctx.model, new, len(seq) - len(new), caches)).fetchone()[0]
            else:
                logits = conn.execute("SELECT llm_internal.llm_gpt2_forward_cached(%s, %s)",
                                      (ctx.model, seq)).fetchone()[0]
            seq.append(conn.execute(STEP, {"logits": logits, "step": i}).fetchone()[0])
            conn.execute("SELECT llm_scratch_release(%s)", (step_mark,))
            dt = time.perf_counter() - t0
            if use_cache and i == 0:
                prefill = dt
            else:
                times.append(dt)
        return prefill, times
    finally:
        conn.execute("SELECT llm_scratch_release(%s)", (mark,))


def requested(argv: list[str]) -> bool:
    """--only model / --only=model on the command line, or PG_LLM_BENCH_MODEL=1."""
    only = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--only"] + \
        [a.split("=", 1)[1] for a in argv if a.startswith("--only=")]
    return "model" in only or os.environ.get("PG_LLM_BENCH_MODEL") == "1"


def run(ctx: Context) -> list[Table]:
    if not requested(sys.argv):
        t = Table("GPT-2 small generation", ["status"])
        t.add("skipped (slow): run with --only model or PG_LLM_BENCH_MODEL=1")
        return [t]
    _import(ctx)
    steps = 3 if ctx.quick else 8
    rng = np.random.default_rng(0)
    t = Table("GPT-2 small generation (random weights, greedy, one session)",
              ["prefix", "KV cache", "prefill s", "ms/token", "tokens/s", "steps"])
    per_token: dict[tuple[int, bool], float] = {}
    try:
        for prefix in PREFIXES:
            prompt = rng.integers(0, 50257, prefix).tolist()
            for use_cache in (True, False):
                n = steps if use_cache else (2 if prefix > 64 else max(2, steps // 2))
                ctx.log(f"model: prefix {prefix}, cache {use_cache}: {n} steps")
                prefill, times = _decode(ctx, prompt, n, use_cache)
                med = statistics.median(times)
                per_token[(prefix, use_cache)] = med
                t.add(prefix, "yes" if use_cache else "no", prefill, med * 1e3, 1 / med, n)
    finally:
        ctx.conn.execute("SELECT llm_model_drop(%s, TRUE)", (ctx.model,))
    lo, hi = (per_token[(p, True)] for p in PREFIXES)
    t.notes.append(f"with the cache a token costs {hi / lo:.2f}x as much at prefix {PREFIXES[1]} as at "
                   f"{PREFIXES[0]}; without it {per_token[(PREFIXES[1], False)] / hi:.1f}x the cached cost at "
                   f"{PREFIXES[1]}.")
    t.notes.append("a step = one-row forward through 12 layers (one fused llm_mk_gpt2_block_step call per layer) + "
                   "tied LM head + greedy sampling + scratch release; prefill = the prompt in one pass + first token.")
    tensors, entries, size, hits, misses = ctx.conn.execute(
        "SELECT tensors, entries, bytes, hits, misses FROM llm_weight_cache_stats()").fetchone()
    t.notes.append(f"weights (and KV cache rows) come from the session's weight cache (ops/weight_cache.py): {tensors} "
                   f"tensors, {size / 2**20:.0f} MiB held, {hits} hits, {misses} misses over the whole section.")
    return [t]
