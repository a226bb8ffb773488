"""One training step (and ten) of a tiny GPT-2 from identical weights equals PyTorch: transformers
GPT2LMHeadModel + torch.optim.AdamW with decay/no-decay groups, clip_grad_norm_, the same lr, dropout off."""
from __future__ import annotations

import math

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.loader.tensors import read_tensor

from gpt2_fixtures import import_tiny
from train_fixtures import synthetic_dataset

T, ROWS = 16, 6
HP = dict(lr=1e-3, warmup_steps=3, max_steps=12, min_lr=1e-4, weight_decay=0.01, beta1=0.9, beta2=0.999,
          eps=1e-8, grad_clip=1.0)


def lr_at(step: int) -> float:
    """The reference schedule: linear warmup to the peak, cosine to min_lr at max_steps."""
    peak, warm, total, low = HP["lr"], HP["warmup_steps"], HP["max_steps"], HP["min_lr"]
    if step <= warm:
        return peak * step / warm
    if step >= total:
        return low
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


@pytest.fixture(scope="module")
def setup(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory):
    model = import_tiny(conn, tmp_path_factory.mktemp("train"), "tr")
    synthetic_dataset(conn, "ds", rows=ROWS, val_rows=0, block=T)
    return model


def torch_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if n.endswith(".weight") and ".ln_" not in n]
    other = [p for n, p in model.named_parameters() if not (n.endswith(".weight") and ".ln_" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                              {"params": other, "weight_decay": 0.0}], lr=HP["lr"],
                             betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"])


def sql_step(conn: psycopg.Connection, model: str) -> tuple[float, float, float]:
    row = conn.execute(
        "SELECT loss, lr, grad_norm FROM llm_train_step(%s, dataset => 'ds', batch_size => 2, lr => %s, "
        "warmup_steps => %s, max_steps => %s, min_lr => %s, weight_decay => %s, beta1 => %s, beta2 => %s, "
        "eps => %s, grad_clip => %s, dropout => 0, seed => 7)",
        (model, HP["lr"], HP["warmup_steps"], HP["max_steps"], HP["min_lr"], HP["weight_decay"], HP["beta1"],
         HP["beta2"], HP["eps"], HP["grad_clip"])).fetchone()
    return row


def torch_step(conn: psycopg.Connection, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int):
    rows = conn.execute("SELECT tokens, targets FROM llm_internal.llm_train_batch('ds', 'train', 2, 7, %s, 1)",
                        (step,)).fetchall()
    x = torch.tensor([r[0] for r in rows])
    y = torch.tensor([r[1] for r in rows])
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x).logits.reshape(-1, 301), y.reshape(-1))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), HP["grad_clip"])
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    opt.step()
    return loss.item(), float(norm)


def params(conn: psycopg.Connection, name: str, role: str = "param") -> dict[str, np.ndarray]:
    rows = conn.execute("SELECT name, id FROM llm_tensor WHERE model = %s AND role = %s", (name, role)).fetchall()
    return {n: read_tensor(conn, i) for n, i in rows}


def test_one_step_equals_torch(conn: psycopg.Connection, setup) -> None:
    model = setup
    model.train()  # dropout probabilities are 0 in the fixture config
    opt = torch_optimizer(model)
    loss, lr, norm = sql_step(conn, "tr")
    ref_loss, ref_norm = torch_step(conn, model, opt, 1)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert lr == pytest.approx(lr_at(1), rel=1e-12)
    assert norm == pytest.approx(ref_norm, rel=1e-4)
    sd = {n.removeprefix("transformer."): p for n, p in model.named_parameters()}
    state = {n.removeprefix("transformer."): opt.state[p] for n, p in model.named_parameters()}
    for role, get in (("param", lambda n: sd[n].detach()), ("adam_m", lambda n: state[n]["exp_avg"]),
                      ("adam_v", lambda n: state[n]["exp_avg_sq"])):
        got = params(conn, "tr", role)
        assert set(got) == set(sd)
        for n, a in got.items():
            ref = get(n).numpy().reshape(a.shape)
            assert np.abs(a - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max(), (role, n)
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'tr'").fetchone()[0] == 1
    # nothing of the step is left behind
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM llm_internal.llm_tape").fetchone()[0] == 0


def test_ten_steps_track_torch(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory, setup,
                               train_path: str) -> None:
    name = f"tr10_{train_path}"
    model = import_tiny(conn, tmp_path_factory.mktemp("train10"), name)
    model.train()
    opt = torch_optimizer(model)
    for step in range(1, 11):
        loss, _, _ = sql_step(conn, name)
        ref, _ = torch_step(conn, model, opt, step)
        assert abs(loss - ref) <= 1e-4, (step, loss, ref)
    logged = conn.execute("SELECT step FROM llm_train_log WHERE model = %s ORDER BY step", (name,)).fetchall()
    assert [s for (s,) in logged] == list(range(1, 11))


def test_gradients_equal_torch(conn: psycopg.Connection, setup, tmp_path_factory: pytest.TempPathFactory,
                               train_path: str) -> None:
    name = f"trg_{train_path}"
    model = import_tiny(conn, tmp_path_factory.mktemp("grads"), name)
    rng = np.random.default_rng(11)
    x, y = rng.integers(0, 301, (2, T)), rng.integers(0, 301, (2, T))
    with conn.transaction():
        tape = conn.execute("SELECT llm_scratch_mark()").fetchone()[0]
        loss = conn.execute("SELECT llm_internal.llm_gpt2_loss_backward(%s, %s, %s, %s, %s)",
                            (name, x.ravel().tolist(), y.ravel().tolist(), T, tape)).fetchone()[0]
        grads = {n: read_tensor(conn, g) for n, g in conn.execute(
            "SELECT v.name, llm_internal.llm_grad_of(%s, v.id) FROM llm_tensor AS v "
            "WHERE v.model = %s AND v.role = 'param'",
            (tape, name))}
        conn.execute("SELECT llm_scratch_release(%s)", (tape,))
    ref = torch.nn.functional.cross_entropy(model(torch.tensor(x)).logits.reshape(-1, 301),
                                            torch.tensor(y).reshape(-1))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5 * ref.item()
    for n, p in model.named_parameters():
        g = grads[n.removeprefix("transformer.")]
        want = p.grad.numpy().reshape(g.shape)
        assert np.abs(g - want).max() <= 1e-5 + 1e-4 * np.abs(want).max(), n


def test_held_gradients_are_the_written_ones(conn: psycopg.Connection, setup,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """p_hold keeps the parameter gradients in the backend's memory (ops/held.py): no tiles, the same global norm,
    and written out (llm_held_write) exactly the gradients of the written path; two micro-batches add in memory."""
    name = "trh"
    import_tiny(conn, tmp_path_factory.mktemp(name), name)
    rng = np.random.default_rng(5)
    batches = [(rng.integers(0, 301, 2 * T).tolist(), rng.integers(0, 301, 2 * T).tolist()) for _ in range(2)]
    sql = "SELECT llm_internal.llm_gpt2_loss_backward(%s, %s, %s, %s, %s, 0.1, 7, 0.5, p_hold => %s)"
    out = {}
    for hold in (False, True):
        with conn.transaction():
            tape = conn.execute("SELECT llm_scratch_mark()").fetchone()[0]
            for x, y in batches:
                conn.execute(sql, (name, x, y, T, tape, hold))
            ids = [i for (i,) in conn.execute("SELECT llm_internal.llm_grad_of(%s, v.id) FROM llm_tensor AS v "
                                              "WHERE v.model = %s AND v.role = 'param' ORDER BY v.id", (tape, name))]
            tiles = conn.execute("SELECT count(*) FROM llm_tile WHERE tensor_id = ANY(%s::BIGINT[])",
                                 (ids,)).fetchone()[0]
            norm = conn.execute("SELECT llm_global_grad_norm(%s::BIGINT[])", (ids,)).fetchone()[0]
            if hold:
                assert tiles == 0 and len(ids) == len(out[False][2])
                conn.execute("SELECT llm_internal.llm_held_write(i) FROM unnest(%s::BIGINT[]) AS i", (ids,))
            out[hold] = norm, [read_tensor(conn, i) for i in ids], ids
            assert conn.execute("SELECT llm_internal.llm_mk_hold(%s, FALSE)", (tape,)).fetchone()[0] == 0
            conn.execute("SELECT llm_scratch_release(%s)", (tape,))
    assert abs(out[True][0] - out[False][0]) <= 1e-12 * out[False][0]
    for a, b in zip(out[True][1], out[False][1], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fused_step_equals_chain_with_dropout(conn: psycopg.Connection, setup, tied: bool,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two steps with dropout 0.2 and 2 accumulated micro-batches: the fused input, blocks and head give the chain's
    loss, gradient norm, parameters and moments (the same dropout masks), and leave no scratch behind; with the
    head tied to wte (its gradient folded into the embedding's) and untied (lm_head's written on its own)."""
    out = {}
    for path in ("off", "on"):
        name = f"trd_{path}_{tied}"
        import_tiny(conn, tmp_path_factory.mktemp(name), name, tie_word_embeddings=tied)
        conn.execute("SELECT set_config('pg_llm.fused_train', %s, FALSE)", (path,))
        try:
            logs = [conn.execute("SELECT loss, grad_norm FROM llm_train_step(%s, dataset => 'ds', batch_size => 2, "
                                 "dropout => 0.2, grad_accum => 2, seed => 3)", (name,)).fetchone() for _ in range(2)]
        finally:
            conn.execute("RESET pg_llm.fused_train")
        out[path] = logs, {r: params(conn, name, r) for r in ("param", "adam_m", "adam_v")}
        assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0] == 0
    (chain_logs, chain), (fused_logs, fused) = out["off"], out["on"]
    assert ("lm_head.weight" in fused["param"]) is not tied
    for (lc, nc), (lf, nf) in zip(chain_logs, fused_logs, strict=True):
        assert abs(lc - lf) <= 1e-6 * lc and abs(nc - nf) <= 1e-5 * nc
    for role, tensors in chain.items():
        for n, a in tensors.items():
            assert np.abs(fused[role][n] - a).max() <= 1e-6 + 1e-5 * np.abs(a).max(), (role, n)


def test_kept_intermediates_change_nothing(conn: psycopg.Connection, setup,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """A step's blocks keep their forward intermediates for the backward (pg_llm.train_keep_mb) or recompute them
    (0): the same parameters and moments, bit for bit, with dropout; one kept block of two (0.13 MB: a block keeps
    15 x 32 x 48 floats here)."""
    out = {}
    for keep in ("0", "0.13", "64"):
        name = f"trk_{keep.replace('.', '_')}"
        import_tiny(conn, tmp_path_factory.mktemp(name), name)
        conn.execute("SELECT set_config('pg_llm.train_keep_mb', %s, FALSE)", (keep,))
        try:
            conn.execute("SELECT llm_train_step(%s, dataset => 'ds', batch_size => 2, dropout => 0.2, seed => 3)",
                         (name,))
        finally:
            conn.execute("RESET pg_llm.train_keep_mb")
        out[keep] = {r: params(conn, name, r) for r in ("param", "adam_m", "adam_v")}
    for keep in ("0.13", "64"):
        for role, tensors in out["0"].items():
            assert all(np.array_equal(out[keep][role][n], a) for n, a in tensors.items()), (keep, role)
