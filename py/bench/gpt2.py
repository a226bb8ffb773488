"""Bench section `gpt2`: GPT-2 end to end against the numpy reference and torch, in the same run.

* forward tokens/s of GPT-2 small (random weights: transformers GPT2LMHeadModel(GPT2Config()), seed 0, saved
  offline and imported once) at T = 128 and 1024: pg_llm (llm_gpt2_forward + scratch release; llm_logits, the
  last position only; at T=128 also SELECT * FROM llm_logits_all, every logit as float4[] to the client), the numpy
  reference (py/reference/numpy_gpt2.py) and torch on the CPU (inference mode);
* `pg-llm model import` / `export` seconds (import_model / export_model);
* one training step at batch 1 x 128 tokens for a tiny config and for GPT-2 small: llm_train_step against the
  same step in torch (forward + backward + clip_grad_norm_ + AdamW with decay groups) and in numpy
  (loss_and_grads + clipping + AdamW), dropout off everywhere.

torch gets torch.set_num_threads(the server's OpenBLAS threads) and the client's numpy the same OpenBLAS thread
count, so the three use the same cores. Variants are interleaved (Context.compare); the big measurements
(T=1024, GPT-2 small training) use two timed runs. --quick skips them. After each pg_llm training step the
tile partitions are vacuumed (untimed): a GPT-2 small step leaves ~1.5 GB of dead parameter/moment tiles, and
autovacuum running during the next timed step would be measured with it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pg_llm.assets import ROOT
from pg_llm.bench import Context, Stats, Table, Timed, random_dataset, server_setup_sql
from pg_llm.config import GPT2Config as PgConfig
from pg_llm.config import TrainConfig
from pg_llm.kernels.doctor import blas_probe

CACHE = ROOT / ".pg_llm" / "bench-models"
SEED = 0
T_FORWARD = (128, 1024)
T_TRAIN = 128
TINY = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=1000, bos_token_id=999, eos_token_id=999)
HP = {k: getattr(TrainConfig(), k) for k in ("lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip")}


def checkpoint(name: str, **overrides: Any) -> Path:
    """A seeded random GPT-2 (GPT2Config(**overrides)) saved with save_pretrained, cached under .pg_llm."""
    path = CACHE / f"{name}-seed{SEED}"
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    GPT2LMHeadModel(GPT2Config(**overrides)).save_pretrained(path)
    return path


class Gpt2Bench:
    def __init__(self, ctx: Context) -> None:
        self.ctx, self.conn = ctx, ctx.conn
        self.models: list[str] = []
        self.chain_conn = ctx.connect()
        self.datasets: list[str] = []
        self.conn.execute(server_setup_sql(ctx.schema))
        server = json.loads(self.conn.execute(f"SELECT {ctx.schema}.blas(0)").fetchone()[0])
        self.threads = int(server.get("threads") or os.cpu_count() or 1)
        self.client_threads = blas_probe().get("threads")
        blas_probe(self.threads)
        import torch

        self.torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
        self.chain_conn.close()
        if self.client_threads:
            blas_probe(int(self.client_threads))
        for m in self.models:
            self.conn.execute("SELECT llm_model_drop(%s, TRUE)", (m,))
            self.conn.execute("DELETE FROM llm_model_config AS c WHERE c.name = %s AND NOT EXISTS "
                              "(SELECT 1 FROM llm_model AS m WHERE m.config = c.name)", (m,))
        for d in self.datasets:
            self.conn.execute("DELETE FROM llm_dataset_source WHERE dataset = %s", (d,))

    # ---- setup ----------------------------------------------------------------------------------------------
    def load(self, name: str, path: Path) -> tuple[str, float]:
        """Import a checkpoint as model ctx.model + '_' + name: (model, seconds)."""
        from pg_llm.loader.model import import_model

        model = f"{self.ctx.model}_{name}"
        self.models.append(model)
        r = import_model(self.conn, path, model, replace=True)
        return model, r.seconds

    def dataset(self, model: str, vocab: int) -> str:
        """A few random rows of T_TRAIN tokens (registered like the corpus loader does)."""
        name = model + "_ds"
        self.datasets.append(name)
        random_dataset(self.conn, name, 4, T_TRAIN, vocab, SEED)
        return name

    def compare(self, fns: dict[str, Timed], runs: int, warmup: int) -> dict[str, Stats]:
        saved = self.ctx.warmup
        self.ctx.warmup = warmup
        try:
            return self.ctx.compare(fns, runs=runs)
        finally:
            self.ctx.warmup = saved

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, model: str, path: Path) -> Table:
        from safetensors.numpy import load_file
        from transformers import GPT2LMHeadModel

        from pg_llm.config import STANDARD
        from pg_llm.reference import numpy_gpt2 as ref

        cfg = STANDARD["gpt2-small"]
        params = ref.cast(ref.normalize_params(load_file(path / "model.safetensors")), cfg, np.float32)
        tm = GPT2LMHeadModel.from_pretrained(path).eval()
        t = Table("GPT-2 small forward, one sequence of T tokens (random weights)",
                  ["T", "llm_logits s", "llm_perplexity s", "llm_logits_all s", "chain s", "numpy s", "torch s",
                   "torch tok/s", "logits / torch", "perplexity / torch", "chain / torch"])
        for T in T_FORWARD[:1] if self.ctx.quick else T_FORWARD:
            self.ctx.log(f"gpt2: forward T={T}")
            st = self.forward_at(T, model, lambda idx: ref.forward(params, idx, cfg), tm)
            pg, last, ppl, nump, tor = (st[k].median for k in ("pg", "last", "ppl", "numpy", "torch"))
            t.add(T, last, ppl, st["all"].median if "all" in st else None, pg, nump, tor, T / tor,
                  f"{last / tor:.2f}", f"{ppl / tor:.2f}", f"{pg / tor:.2f}")
        t.notes += ["llm_logits = the last position's logits (the API; one fused call, ops/score.py: only that row "
                    "is projected on wte); llm_perplexity = llm_perplexity_tokens of the T tokens (every row's "
                    "logits, chunked, and their NLL); llm_logits_all also returns every logit row as float4[] to "
                    "the client; chain = llm_gpt2_forward + llm_scratch_release (the training forward's kernel "
                    "chain, every T x 50257 logit written as tiles); torch computes every logit.",
                    f"{self.threads} BLAS threads for the server's numpy, the client's numpy and torch "
                    f"(torch.set_num_threads({self.threads})); T=1024: median of 2 runs, no warm-up."]
        return t

    def forward_at(self, T: int, model: str, numpy_fwd: Any, tm: Any) -> dict[str, Stats]:
        import torch

        idx = np.random.default_rng(T).integers(0, 50257, (1, T))
        toks, x = idx[0].tolist(), torch.tensor(idx)
        fwd = f"SELECT {self.ctx.schema}.gpt2_forward(%s, %s)"

        def torch_fwd() -> None:
            with torch.inference_mode():
                tm(x)
        # the chain in a session of its own: its weight-cache entries (matmul panels) would evict the fused calls'
        chain = self.chain_conn
        fns = {"pg": Timed(lambda: chain.execute(fwd, (model, toks))), "numpy": Timed(lambda: numpy_fwd(idx)),
               "torch": Timed(torch_fwd),
               "last": Timed(lambda: self.conn.execute("SELECT llm_logits(%s, %s)", (model, toks)).fetchone()),
               "ppl": Timed(lambda: self.conn.execute("SELECT * FROM llm_perplexity_tokens(%s, %s)",
                                                      (model, toks)).fetchone())}
        if T <= 128:
            fns["all"] = Timed(lambda: self.conn.execute("SELECT * FROM llm_logits_all(%s, %s)",
                                                         (model, toks)).fetchall())
        big = T > 128
        return self.compare(fns, runs=2 if big else min(self.ctx.runs, 3), warmup=0 if big else 1)

    # ---- training -------------------------------------------------------------------------------------------
    def train(self, rows: list[tuple[str, Path, str]]) -> Table:
        t = Table(f"One training step, batch 1 x {T_TRAIN} tokens (forward, backward, clip, AdamW)",
                  ["config", "params", "pg_llm s", "numpy s", "torch s", "pg / numpy", "pg / torch"])
        for label, path, model in rows:
            self.ctx.log(f"gpt2: training step, {label}")
            cfg = PgConfig.from_hf(json.loads((path / "config.json").read_text()))
            st = self.train_step(path, model, cfg, big="small" in label)
            pg, nump, tor = (st[k].median for k in ("pg", "numpy", "torch"))
            t.add(label, cfg.n_params(), pg, nump, tor, pg / nump, pg / tor)
        t.notes += ["dropout 0 everywhere; one warm-up step first (it creates the AdamW moments); GPT-2 small: "
                    "median of 2 runs; VACUUM of the tile partitions after each pg_llm step (untimed).",
                    f"tiny = {', '.join(f'{k}={v}' for k, v in TINY.items() if not k.endswith('token_id'))}; "
                    f"{self.threads} BLAS threads for the server, the client's numpy and torch."]
        return t

    def train_step(self, path: Path, model: str, cfg: PgConfig, big: bool) -> dict[str, Stats]:
        ds = self.dataset(model, cfg.vocab_size)
        tokens, targets = self.conn.execute("SELECT tokens, targets FROM llm_dataset WHERE dataset = %s "
                                            "ORDER BY pos LIMIT 1", (ds,)).fetchone()
        x, y = np.array([tokens]), np.array([targets])
        sql = ("SELECT loss FROM llm_train_step(%s, %s, batch_size => 1, dropout => 0, lr => %s, weight_decay => %s, "
               "beta1 => %s, beta2 => %s, eps => %s, grad_clip => %s)")
        args = (model, ds, HP["lr"], HP["weight_decay"], HP["beta1"], HP["beta2"], HP["eps"], HP["grad_clip"])
        return self.compare({"pg": Timed(lambda: self.conn.execute(sql, args), after=self.vacuum),
                             "numpy": Timed(_numpy_step(path, x, y, cfg)), "torch": Timed(_torch_step(path, x, y))},
                            runs=2 if big else min(self.ctx.runs, 3), warmup=1)

    def vacuum(self) -> None:
        for part in ("llm_tile_durable", "llm_tile_scratch"):
            try:
                self.conn.execute(f"VACUUM {part}")
            except Exception as e:  # noqa: BLE001 - not the owner (--dsn): autovacuum will do it
                self.ctx.log(f"VACUUM {part}: {e}")


def torch_model(path: Path, dropout: float) -> tuple[Any, Any]:
    """transformers' GPT-2 in train mode (dropout at every site) and torch's AdamW with llm_train_step's decay
    groups (matmul weights and embeddings decay, biases and LayerNorm do not) and hyperparameters."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path, resid_pdrop=dropout, embd_pdrop=dropout,
                                            attn_pdrop=dropout).train()
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith(".weight") and ".ln_" not in n]
    other = [p for n, p in named if not (n.endswith(".weight") and ".ln_" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                             {"params": other, "weight_decay": 0.0}], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]),
                            eps=HP["eps"])
    return model, opt


def _torch_step(path: Path, x: np.ndarray, y: np.ndarray):
    """The same step in torch: forward, cross-entropy, backward, clip_grad_norm_, AdamW (decay groups)."""
    import torch

    model, opt = torch_model(path, 0.0)
    xt, yt = torch.tensor(x), torch.tensor(y)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(xt).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP["grad_clip"])
        opt.step()
        return loss.item()
    return step


def _numpy_step(path: Path, x: np.ndarray, y: np.ndarray, cfg: PgConfig):
    """The same step in numpy: loss_and_grads, global-norm clipping and an in-place float32 AdamW."""
    from safetensors.numpy import load_file

    from pg_llm.reference import numpy_gpt2 as ref

    params = ref.cast(ref.normalize_params(load_file(path / "model.safetensors")), cfg, np.float32)
    params = {k: np.array(v) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    state = {"t": 0}

    def step() -> float:
        loss, grads = ref.loss_and_grads(params, x, y, cfg)
        norm = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel())) for g in grads.values()))
        coef = min(1.0, HP["grad_clip"] / (norm + 1e-6))
        state["t"] += 1
        t, lr, b1, b2 = state["t"], HP["lr"], HP["beta1"], HP["beta2"]
        for k, p in params.items():
            g = grads[k] * np.float32(coef)
            if k.endswith(".weight") and ".ln_" not in k:
                p *= np.float32(1 - lr * HP["weight_decay"])
            m[k] *= np.float32(b1)
            m[k] += np.float32(1 - b1) * g
            v2[k] *= np.float32(b2)
            v2[k] += np.float32(1 - b2) * g * g
            denom = np.sqrt(v2[k]) / np.float32(math.sqrt(1 - b2 ** t)) + np.float32(HP["eps"])
            p -= np.float32(lr / (1 - b1 ** t)) * m[k] / denom
        return loss
    return step


def run(ctx: Context) -> list[Table]:
    b = Gpt2Bench(ctx)
    tables: list[Table] = []
    try:
        ctx.conn.execute(f"""
            CREATE OR REPLACE FUNCTION {ctx.schema}.gpt2_forward(p_model TEXT, p_tokens INT[]) RETURNS VOID
            LANGUAGE plpgsql SET jit = off AS $fn$
            DECLARE v_mark BIGINT := llm_scratch_mark();
            BEGIN
              PERFORM llm_internal.llm_gpt2_forward(p_model, p_tokens);
              PERFORM llm_scratch_release(v_mark);
            END $fn$""")
        ctx.log("gpt2: random GPT-2 small checkpoint (cached in .pg_llm/bench-models)")
        small = checkpoint("gpt2-small")
        tiny = checkpoint("gpt2-tiny", **TINY)
        model, imp = b.load("small", small)
        ctx.log(f"gpt2: imported in {imp:.1f} s; exporting")
        from pg_llm.loader.model import export_model

        out = Path(tempfile.mkdtemp(prefix="pg_llm_bench_export_"))
        try:
            exp = export_model(ctx.conn, model, out, force=True).seconds
        finally:
            shutil.rmtree(out, ignore_errors=True)
        mb = sum(f.stat().st_size for f in small.glob("*.safetensors")) / 1e6
        io = Table("GPT-2 small import / export (pg-llm model import / export)", ["operation", "seconds", "MB/s"])
        io.add("import (safetensors -> tiles, one transaction)", imp, mb / imp)
        io.add("export (tiles -> model.safetensors)", exp, mb / exp)
        io.notes.append(f"{mb:.0f} MB of float32 weights; one run each.")
        tables += [b.forward(model, small), io]
        train = [("tiny", tiny, b.load("tiny", tiny)[0])]
        if not ctx.quick:
            train.append(("GPT-2 small", small, model))
        tables.append(b.train(train))
    finally:
        b.close()
    return tables
