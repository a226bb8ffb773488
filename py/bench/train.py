"""Bench section `train`: GPT-2 small training steps at the playbook's shapes against torch, same run.

One `llm_train_step` (dropout 0.1, AdamW, clipping, the GPT-2 recipe's hyperparameters) of GPT-2 small (random
weights, imported once) at batch 1 x 128 and 2 x 1024 tokens (8 x 1024 in the optional section `train_long`),
against the same step in torch (transformers GPT2LMHeadModel in train mode, dropout 0.1, cross-entropy,
backward, clip_grad_norm_, AdamW with decay groups; torch.set_num_threads = the server's BLAS threads) on the
same rows. Per case: torch's steps first (warm-up steps, then timed consecutive ones, the C library keeping freed
memory as in pg_llm's training backends), then pg_llm's on the same rows (each followed by the VACUUM CALL
llm_train_run runs between its steps, the timed ones by one CHECKPOINT and a sync), as seconds per step of a
sustained loop. Peak scratch = the largest size of the UNLOGGED scratch partition sampled every 0.1 s from another
connection during the timed pg_llm steps.
"""
from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import psycopg

from pg_llm.bench import Context, Table, random_dataset
from pg_llm.bench.gpt2 import HP, Gpt2Bench, checkpoint, torch_model
from pg_llm.kernels.runtime import keep_freed_memory

CASES = ((1, 128), (2, 1024))
ROWS = 32  # dataset rows of 1024 tokens: batches are drawn from them by the step's seed
SEED = 1234
DROPOUT = 0.1
# torch's eager GPT-2 keeps (B, H, T, T) attention probabilities and masks for its backward: 8 x 1024 tokens in one
# forward took more than the machine's 24 GiB (OOM-killed), so torch runs the step in forwards of 2,048 tokens
# (the same step: the mean loss over all rows, gradients accumulated before clipping and AdamW)
TORCH_MICRO_TOKENS = 2048
TORCH_WARMUP = 2  # with freed memory kept, torch's second step still grew its heap (2 x 1024: 77 s, then 21-34 s)
SHORT_TOKENS = 1024  # steps this short get 2 warm-up steps and 4 timed ones


class ScratchPeak:
    """Samples the scratch partition's size from its own connection while running."""

    def __init__(self, ctx: Context) -> None:
        self.conn = ctx.connect()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            size = self.conn.execute("SELECT pg_total_relation_size('llm_tile_scratch')").fetchone()[0]
            self.peak = max(self.peak, int(size))
            time.sleep(0.1)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        self.stop()
        self.conn.close()


def _torch_step(path, B: int, T: int):
    """torch's step on the rows (x, y) it is given: train mode (dropout 0.1), AdamW with decay groups."""
    import torch

    model, opt = torch_model(path, DROPOUT)
    micro = max(1, TORCH_MICRO_TOKENS // T)  # rows per torch forward

    def step(batch: tuple[np.ndarray, np.ndarray]) -> float:
        x, y = batch
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for r in range(0, B, micro):  # the same step: mean loss over all B rows, gradients accumulated
            logits = model(torch.tensor(x[r:r + micro])).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     torch.tensor(y[r:r + micro]).reshape(-1), reduction="sum")
            (loss / (B * x.shape[1])).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP["grad_clip"])
        opt.step()
        return total / (B * x.shape[1])
    return step


# The durable floor of a committed step: every parameter and moment tile rewritten with no arithmetic (new row
# versions through TOAST and WAL, as AdamW's UPDATEs make them): what a crash-safe step pays whatever its kernels.
FLOOR = ("UPDATE llm_tile AS t SET data = substr(t.data, 1) FROM llm_tensor AS v WHERE v.id = t.tensor_id "
         "AND v.model = %s AND v.role IN ('param', 'adam_m', 'adam_v')")
FLOOR_MB = ("SELECT sum(length(t.data)) / 1e6 FROM llm_tile AS t JOIN llm_tensor AS v ON v.id = t.tensor_id "
            "WHERE v.model = %s AND v.role IN ('param', 'adam_m', 'adam_v')")


def _floor(ctx: Context, b: Gpt2Bench, model: str) -> tuple[float, float]:
    """(MB, median seconds of 2 runs) of FLOOR on model, vacuumed after each run (untimed)."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        ctx.conn.execute(FLOOR, (model,))
        _flush(ctx)
        times.append(time.perf_counter() - t0)
        b.vacuum()
    return float(ctx.conn.execute(FLOOR_MB, (model,)).fetchone()[0]), float(np.median(times))


def _flush(ctx: Context) -> None:
    """CHECKPOINT, then sync: the pages a timed statement dirtied reach the disk inside its time. Else the
    checkpointer and the kernel's writeback write them during the next (torch) step: beside them torch's 1 x 128
    step took 5.1-6.3 s instead of 2.0 s alone (2026-12-03), and a training loop pays those writes too."""
    try:
        ctx.conn.execute("CHECKPOINT")
    except psycopg.Error as e:  # not allowed (--dsn without pg_checkpoint): the ratio then flatters pg_llm
        ctx.log(f"CHECKPOINT: {e}")
    os.sync()


def _torch_phase(path, batches: list[tuple[np.ndarray, np.ndarray]], B: int, warmup: int, runs: int) -> float:
    """Seconds per step of `runs` consecutive torch steps after `warmup` ones (at least TORCH_WARMUP), in this
    process with the C library keeping freed memory as pg_llm's training backends do, before pg_llm trains: beside a
    server that had run training steps, torch's 1 x 128 step took 2.3-6.6 s instead of 1.7-2.1 s alone (the
    kernel reclaiming the memory PostgreSQL churned through, 2026-12-03), which flattered the ratio."""
    keep_freed_memory({})  # the allocator policy of pg_llm's training backends (torch's 2 x 1024: 40-55 s -> 21-34 s)
    step = _torch_step(path, B, batches[0][0].shape[1])
    for i in range(max(warmup, TORCH_WARMUP)):  # extra warm-ups repeat pg_llm's warm-up rows
        step(batches[i % warmup])
    t0 = time.perf_counter()
    for batch in batches[warmup:warmup + runs]:  # the rows of pg_llm's timed steps
        step(batch)
    secs = (time.perf_counter() - t0) / runs
    del step
    gc.collect()  # the model, its gradients and AdamW state: gigabytes at 8 x 1024
    return secs


def _pg_phase(ctx: Context, b: Gpt2Bench, peak: ScratchPeak, sql: str, args: tuple, warmup: int,
              runs: int) -> float:
    """Seconds per step of `runs` consecutive llm_train_step calls after `warmup` ones, each followed by the
    VACUUM that CALL llm_train_run runs between its steps, and the run by a CHECKPOINT and a sync: a training
    loop's sustained cost, the writes of its committed steps included."""
    for _ in range(warmup):
        ctx.conn.execute(sql, args)
        b.vacuum()
    _flush(ctx)
    peak.start()
    try:
        t0 = time.perf_counter()
        for _ in range(runs):
            ctx.conn.execute(sql, args)
            b.vacuum()
        _flush(ctx)
        return (time.perf_counter() - t0) / runs
    finally:
        peak.stop()


def run_cases(ctx: Context, cases: tuple[tuple[int, int], ...]) -> list[Table]:
    b = Gpt2Bench(ctx)
    peak = ScratchPeak(ctx)
    t = Table("GPT-2 small training step against torch (dropout 0.1, AdamW, clipping)",
              ["batch", "tokens", "pg_llm s", "torch s", "pg / torch", "pg tokens/s", "torch tokens/s",
               "peak scratch MiB"])
    f = Table("The durable floor of a committed GPT-2 small step, same run",
              ["rewrite (no arithmetic)", "MB", "s", "x torch's step", "torch step of"])
    try:
        path = checkpoint("gpt2-small")
        for B, T in cases:
            model = b.load(f"train_{B}x{T}", path)[0]
            ds = f"{model}_ds"
            b.datasets.append(ds)
            random_dataset(ctx.conn, ds, max(ROWS, 4 * B), T, 50257, SEED)
            sql = ("SELECT loss FROM llm_train_step(%s, %s, batch_size => %s, dropout => %s, seed => %s, lr => %s, "
                   "weight_decay => %s, beta1 => %s, beta2 => %s, eps => %s, grad_clip => %s)")
            args = (model, ds, B, DROPOUT, SEED, HP["lr"], HP["weight_decay"], HP["beta1"], HP["beta2"], HP["eps"],
                    HP["grad_clip"])
            # short steps: 2 warm-up steps (the first creates the AdamW moments, the second still grows the durable
            # partition to its steady size: old and new tile versions; 9.7 s, then 5.8-6.9 s, 2026-12-03)
            warmup, runs = (2, 4) if B * T <= SHORT_TOKENS else (1, 2)
            batches = []  # the rows of pg_llm's steps (the warm-up steps and the timed ones)
            for s in range(1, warmup + runs + 1):
                rows = ctx.conn.execute("SELECT tokens, targets FROM llm_internal.llm_train_batch(%s, 'train', %s, "
                                        "%s, %s, 1)", (ds, B, SEED, s)).fetchall()
                batches.append((np.array([r[0] for r in rows]), np.array([r[1] for r in rows])))
            ctx.log(f"train: {B} x {T}: torch")
            tor = _torch_phase(path, batches, B, warmup, runs)
            ctx.log(f"train: {B} x {T}: pg_llm")
            peak.peak = 0
            pg = _pg_phase(ctx, b, peak, sql, args, warmup, runs)
            t.add(f"{B} x {T}", B * T, pg, tor, pg / tor, B * T / pg, B * T / tor, peak.peak / 2**20)
            if B * T == min(b_ * t_ for b_, t_ in cases):
                mb, secs = _floor(ctx, b, model)
                f.add("every param, adam_m and adam_v tile (UPDATE)", mb, secs, secs / tor, f"{B} x {T}")
            ctx.conn.execute("SELECT llm_model_drop(%s, TRUE)", (model,))
            b.models.remove(model)
    finally:
        peak.close()
        b.close()
    t.notes += [f"GPT-2 small, random weights (seed 0); seconds per step of consecutive steps: torch first (after "
                f"its warm-up steps, before pg_llm's), then pg_llm, each step followed by the VACUUM CALL "
                f"llm_train_run runs, and the timed steps by a CHECKPOINT and a sync (their writes reach the disk "
                f"inside their time); torch in this process with the C library keeping the memory it frees, as "
                f"pg_llm's training backends do (kernels/runtime.keep_freed_memory), and {TORCH_WARMUP} warm-up "
                f"steps at least; "
                f"2 timed steps after 1 warm-up step (4 after 2 up to {SHORT_TOKENS} tokens: the "
                f"second step still grows the durable partition); {b.threads} BLAS threads for the server and torch; "
                f"torch runs a step of more than {TORCH_MICRO_TOKENS} tokens as forwards of {TORCH_MICRO_TOKENS} "
                "tokens with accumulated gradients (in one forward, 8 x 1024 tokens exceed 24 GiB in transformers' "
                "eager attention).",
                "peak scratch: pg_total_relation_size('llm_tile_scratch') sampled every 0.1 s during the timed steps "
                "(it includes earlier steps' dead space until the VACUUM after each step)."]
    f.notes += ["A committed step makes 12 bytes per parameter durable (the new param and both AdamW moments, so "
                "that a crash resumes bit-identically); this is that write alone, as UPDATE ... SET data = "
                "substr(data, 1) over the model's tiles: a floor no kernel removes, which torch's in-memory "
                "optimizer never pays. Median of 2, vacuumed between them."]
    return [t, f]


def run(ctx: Context) -> list[Table]:
    return run_cases(ctx, CASES[:1] if ctx.quick else CASES)
