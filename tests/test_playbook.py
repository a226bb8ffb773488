"""The user's playbook (../shared/seed-playbook.md), executed in order against a fresh database: its SQL
statements verbatim, its scripts replaced by pg_llm's commands (docs/playbook.md).

Default suite: the playbook's names with a tiny architecture registered as 'gpt2-small' (the GPT-2 tokenizer
and vocabulary are real). The slow-marked variant keeps the real GPT-2 small config."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.assets import gpt2_dir
from pg_llm.loader.corpus import shakespeare_dir

from conftest import Server

CLI = str(Path(sys.executable).parent / "pg-llm")
EXT = Path("/usr/share/postgresql/15/extension/pg_llm.control")
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_ctx=64)


def cli(dsn: str, *args: str) -> str:
    p = subprocess.run([CLI, *args[:2], "--dsn", dsn, *args[2:]], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def make_npz(dims: dict[str, int], d: Path) -> Path:
    """What the playbook's convert_gpt2_checkpoint.py produced: the HF GPT-2 tensors as float32 in an .npz
    (weights from transformers, seeded: no pretrained GPT-2 is reachable here) in d, readable by the server."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=dims["n_layer"], n_head=dims["n_head"], n_embd=dims["n_embd"],
                                       n_positions=dims["n_ctx"], vocab_size=50257))
    os.chmod(d, 0o755)  # the server (user postgres) reads it
    path = d / "gpt2-small.npz"
    np.savez(path, **{k.removeprefix("transformer."): v.numpy().astype(np.float32)
                      for k, v in model.state_dict().items() if k != "lm_head.weight" and ".attn.bias" not in k})
    os.chmod(path, 0o644)
    return path


def run_playbook(server: Server, dbname: str, dims: dict[str, int], steps: int, block_size: int) -> None:
    if not EXT.exists():
        pytest.skip(f"{EXT} is missing: the playbook starts with `make install` (make setup does it as root)")
    with tempfile.TemporaryDirectory(prefix="pg_llm_playbook_") as d:
        _run_playbook(server, dbname, dims, steps, block_size, Path(d))


def _run_playbook(server: Server, dbname: str, dims: dict[str, int], steps: int, block_size: int, tmp: Path) -> None:
    with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {dbname}")
    dsn = psycopg.conninfo.make_conninfo(server.admin_dsn, dbname=dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        q = conn.execute
        # 1. Build and enable the extension
        q("CREATE EXTENSION pg_llm;")
        cfg = q("SELECT n_layer, n_head, n_embd, n_ctx, vocab_size FROM llm_model_config WHERE name = 'gpt2-small'")
        assert cfg.fetchone() == (12, 12, 768, 1024, 50257)
        if dims != dict(n_layer=12, n_head=12, n_embd=768, n_ctx=1024):
            q("UPDATE llm_model_config SET n_layer = %(n_layer)s, n_head = %(n_head)s, n_embd = %(n_embd)s, "
              "n_ctx = %(n_ctx)s WHERE name = 'gpt2-small'", dims)
        # 2. Import reference weights and tokenizer assets
        npz = make_npz(dims, tmp)
        cli(dsn, "tokenizer", "import", "--name", "gpt2", str(gpt2_dir() / "encoder.json"),
            str(gpt2_dir() / "vocab.bpe"))
        assert q("SELECT count(*) FROM llm_bpe_vocab WHERE tokenizer = 'gpt2'").fetchone()[0] == 50257
        assert q("SELECT count(*) FROM llm_bpe_merges WHERE tokenizer = 'gpt2'").fetchone()[0] == 50000
        q(f"SELECT pg_llm_import_npz('{npz}','gpt2-small');")
        n_params = q("SELECT count(DISTINCT name) FROM llm_param WHERE model = 'gpt2-small'").fetchone()[0]
        assert n_params == 2 + 12 * dims["n_layer"] + 2
        # 3. Prepare the corpus
        plays = [str(shakespeare_dir() / f"{p}.txt") for p in ("hamlet", "macbeth")]
        cli(dsn, "corpus", "load", "--name", "shakespeare", "--block-size", str(block_size), "-q", *plays)
        assert q("SELECT COUNT(*) FROM llm_dataset;").fetchone()[0] >= 50  # 660+ windows of 128, 1,300+ of 64
        # 4. The GPT-2 schedule, verbatim; a real run is 500000 steps: we interrupt it after `steps` committed
        val = q("SELECT tokens, targets FROM llm_dataset WHERE split = 'val' ORDER BY id LIMIT 1").fetchone()
        loss0 = q("SELECT llm_loss('gpt2-small', %s, %s, training => false)", val).fetchone()[0]
        out: dict = {}

        def train() -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                out["pid"] = c.info.backend_pid
                c.add_notice_handler(lambda d: out.setdefault("notices", []).append(d.message_primary))
                try:
                    c.execute("""SELECT llm_train(
    'gpt2-small',
    500000,            -- total steps (adjust based on dataset size)
    grad_workers => 4,
    prune_workers => 4
);""")
                except psycopg.errors.QueryCanceled as e:
                    out["cancelled"] = e

        t = threading.Thread(target=train)
        t.start()
        deadline = time.time() + 600
        while q("SELECT count(*) FROM llm_train_log").fetchone()[0] < steps:
            assert time.time() < deadline and t.is_alive(), out
            time.sleep(0.2)
        q("SELECT pg_cancel_backend(%s)", (out["pid"],))
        t.join(600)
        assert "cancelled" in out
        assert any("grad_workers => 4 and prune_workers => 4" in n for n in out["notices"])
        assert any(n.startswith("step 1/500000 | loss") for n in out["notices"])
        # the verbatim call trained with the paper's warmup (lr 2.5e-4 * s / 2000): continue at a visible lr
        q("SELECT llm_train('gpt2-small', %s, dataset => 'shakespeare', lr => 3e-3, warmup_steps => 1, "
          "dropout => 0.0, max_steps => %s)", (steps + 6, steps + 6))
        # 5. Measure perplexity and validation loss
        with pytest.raises(psycopg.errors.RaiseException, match="the call says 12, 12, 768, 50257") \
                if dims["n_layer"] != 12 else _nothing():
            q("SELECT exp(llm_loss('gpt2-small', seq, target, 12, 12, 768, 50257, training => false)) "
              "FROM (SELECT tokens AS seq, targets AS target FROM llm_dataset WHERE split = 'val' LIMIT 1) AS v")
        ppl = q("SELECT exp(llm_loss('gpt2-small', seq, target, %s, %s, %s, 50257, training => false)) FROM "
                "(SELECT tokens AS seq, targets AS target FROM llm_dataset WHERE split = 'val' ORDER BY id LIMIT 1) "
                "AS v", (dims["n_layer"], dims["n_head"], dims["n_embd"])).fetchone()[0]
        assert ppl < math.exp(loss0), (ppl, math.exp(loss0))
        log = q("SELECT step, loss, exp(loss) AS perplexity FROM llm_train_log WHERE model='gpt2-small' "
                "ORDER BY step;").fetchall()
        assert [s for s, _, _ in log] == list(range(1, steps + 7))
        assert log[-1][1] < log[0][1] and all(abs(p - math.exp(loss)) < 1e-6 * p for _, loss, p in log)
        # 6. Checkpoints and inference
        ckpt = q("SELECT llm_checkpoint_save('gpt2-small', 'playbook')").fetchone()[0]
        saved = q("SELECT llm_loss('gpt2-small', %s, %s, training => false)", val).fetchone()[0]
        q("SELECT llm_train('gpt2-small', %s, dataset => 'shakespeare', lr => 3e-3, warmup_steps => 1, "
          "dropout => 0.0, max_steps => %s)", (steps + 8, steps + 8))
        q("SELECT llm_checkpoint_load('gpt2-small', %s)", (ckpt,))
        assert q("SELECT llm_loss('gpt2-small', %s, %s, training => false)", val).fetchone()[0] == saved
        q("SELECT llm_model_create('gpt2-baseline', 'gpt2-small')")
        q(f"SELECT pg_llm_import_npz('{npz}','gpt2-baseline');")
        base = q("SELECT llm_loss('gpt2-baseline', %s, %s, training => false)", val).fetchone()[0]
        assert base == loss0 and saved < base
        text = q("SELECT llm_generate('To be, or not to be', 8, 0.8, 40, 0.95, 'gpt2-small', true)").fetchone()[0]
        again = q("SELECT llm_generate('To be, or not to be', 8, 0.8, 40, 0.95, 'gpt2-small', true)").fetchone()[0]
        assert text and text == again
        rows = q("SELECT * FROM llm_generate_stream('To be', 4, 0.0, 0, 1.0, 'gpt2-small', false)").fetchall()
        assert [r[0] for r in rows] == [0, 1, 2, 3]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_playbook_tiny(server: Server) -> None:
    run_playbook(server, "t_playbook", TINY, steps=2, block_size=64)


@pytest.mark.slow
def test_playbook_gpt2_small(server: Server) -> None:
    # The playbook's "adjust --block-size for shorter contexts": 128-token windows keep a step of the default
    # batch (8 rows) short; one step of 8 x 1024 tokens takes ~150 s here (make bench train_long).
    run_playbook(server, "t_playbook_small", dict(n_layer=12, n_head=12, n_embd=768, n_ctx=1024), steps=1,
                 block_size=128)
