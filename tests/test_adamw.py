"""AdamW step against torch.optim.AdamW over several steps on ragged tiles, the optimizer state helper, the zero
utilities, and errors that write nothing."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels import runtime
from pg_llm.kernels.adamw import adamw_tile
from pg_llm.loader.tensors import write_tensor

from conftest import close
from helpers import FakePlpy, call, get, param, put

PARAMS = [  # (shape, tile): ragged edges, a 1-D tensor, a tile larger than the tensor
    ((37, 50), (16, 16)),
    ((21,), (1, 8)),
    ((3, 300), (256, 256)),
    ((5, 7), (4, 4)),
]
STEP_SQL = "SELECT llm_adamw_step(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


def snapshot(conn: psycopg.Connection) -> tuple[str, int]:
    """Every tile's content and the catalog size: a refused op must leave both unchanged."""
    return conn.execute("SELECT md5(coalesce(string_agg(tensor_id || ':' || tr || ':' || tc || ':' || md5(data), "
                        "',' ORDER BY tensor_id, tr, tc), '')), (SELECT count(*) FROM llm_tensor) "
                        "FROM llm_tile").fetchone()


def refused(conn: psycopg.Connection, match: str, sql: str, *args: object) -> None:
    before = snapshot(conn)
    with pytest.raises(psycopg.errors.RaiseException, match=match):
        conn.execute(sql, args)
    assert snapshot(conn) == before, "a refused op wrote something"


def state(conn: psycopg.Connection, pid: int) -> tuple[int, int]:
    return conn.execute("SELECT m_id, v_id FROM llm_internal.llm_adamw_state(%s)", (pid,)).fetchone()


def grads_like(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gradients spanning magnitudes 1e-5 .. 10, so eps and the bias corrections both matter."""
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-5, 1, shape)).astype(np.float32)


# ---- numpy microkernel, no server ---------------------------------------------------------------------------

def test_microkernel_matches_formula(rng: np.random.Generator) -> None:
    p, g = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    m, v = rng.standard_normal(12).astype(np.float32), rng.uniform(0, 2, 12).astype(np.float32)
    lr, b1, b2, eps, wd, scale, t = 3e-3, 0.9, 0.95, 1e-8, 0.1, 0.5, 7
    out = adamw_tile(p.tobytes(), g.tobytes(), m.tobytes(), v.tobytes(),
                     [lr, b1, b2, eps, wd, scale, t])
    p1, m1, v1 = (np.frombuffer(b, "<f4") for b in out)
    g64 = g.astype(np.float64) * scale
    m_ref = b1 * m + (1 - b1) * g64
    v_ref = b2 * v + (1 - b2) * g64**2
    p_ref = p * (1 - lr * wd) - lr * (m_ref / (1 - b1**t)) / (np.sqrt(v_ref / (1 - b2**t)) + eps)
    np.testing.assert_allclose(m1, m_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v1, v_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p1, p_ref, rtol=1e-6, atol=1e-7)


def test_microkernel_refuses_mismatched_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "plpy", FakePlpy)
    a, b = np.zeros(4, "<f4").tobytes(), np.zeros(3, "<f4").tobytes()
    with pytest.raises(FakePlpy.Error, match="tiles of 4, 4, 3 and 4 floats"):
        adamw_tile(a, a, b, a, [1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 1])


# ---- against torch.optim.AdamW ------------------------------------------------------------------------------

@pytest.mark.parametrize("wd,scale", [(0.0, 1.0), (0.01, 1.0), (0.01, 0.37), (0.1, 0.25)])
def test_steps_match_torch(conn: psycopg.Connection, rng: np.random.Generator, wd: float, scale: float) -> None:
    model, lr, betas, eps = f"adamw_{wd}_{scale}", 1e-2, (0.9, 0.95), 1e-8
    init = [rng.standard_normal(shape).astype(np.float32) for shape, _ in PARAMS]
    ids = [param(conn, a, f"w{i}", model, tile) for i, (a, (_, tile)) in enumerate(zip(init, PARAMS, strict=True))]
    states = [state(conn, pid) for pid in ids]
    tp = [torch.tensor(a, requires_grad=True) for a in init]
    opt = torch.optim.AdamW(tp, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for step in range(1, 6):
        for i, (t, pid, (m, v), (shape, tile)) in enumerate(zip(tp, ids, states, PARAMS, strict=True)):
            g = grads_like(rng, shape)
            t.grad = torch.tensor(g) * scale  # as clip_grad_norm_ / accumulation averaging scale .grad
            gid = write_tensor(conn, g, f"w{i}", model=model, role="grad", tile=tile, replace=True)
            assert call(conn, STEP_SQL, pid, gid, m, v, step, lr, *betas, eps, wd, scale) == pid
        opt.step()
        for pid, t in zip(ids, tp, strict=True):
            np.testing.assert_allclose(get(conn, pid), t.detach().numpy(), rtol=1e-5, atol=1e-6)
    for (m, v), t in zip(states, tp, strict=True):
        close(get(conn, m), opt.state[t]["exp_avg"].numpy())
        close(get(conn, v), opt.state[t]["exp_avg_sq"].numpy())


def test_chunked_updates_are_identical(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """pg_llm.adamw_chunk_floats = 1000 cuts (37, 50) in 16-row tiles into 3 UPDATEs: same result as one UPDATE."""
    a, g = rng.standard_normal((37, 50)).astype(np.float32), rng.standard_normal((37, 50)).astype(np.float32)
    out = []
    for chunk in ("", "1000"):
        pid = param(conn, a, f"c{chunk}", "chunks", (16, 16))
        m, v = state(conn, pid)
        conn.execute("SELECT set_config('pg_llm.adamw_chunk_floats', %s, FALSE)", (chunk,))
        for step in (1, 2):
            conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, %s, 1e-2)", (pid, put(conn, g, (16, 16)), m, v, step))
        out.append([get(conn, t) for t in (pid, m, v)])
    conn.execute("SELECT set_config('pg_llm.adamw_chunk_floats', '', FALSE)")
    for x, y in zip(*out, strict=True):
        assert np.array_equal(x, y)


def test_defaults_match_torch_defaults(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """beta1 0.9, beta2 0.999, eps 1e-8, weight_decay 0.01, grad_scale 1: torch.optim.AdamW's defaults."""
    a = rng.standard_normal((9, 11)).astype(np.float32)
    pid = param(conn, a, "w", "defaults", (4, 4))
    m, v = state(conn, pid)
    t = torch.tensor(a, requires_grad=True)
    opt = torch.optim.AdamW([t], lr=1e-3, foreach=False)
    for step in (1, 2, 3):
        g = grads_like(rng, a.shape)
        t.grad = torch.tensor(g)
        opt.step()
        conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, %s, 1e-3)", (pid, put(conn, g, (4, 4)), m, v, step))
        np.testing.assert_allclose(get(conn, pid), t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_late_step_bias_corrections_vanish(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """beta^t underflows to 0 at t = 500000: the corrections become 1 (no float underflow error)."""
    a, g = rng.standard_normal(10).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    pid = param(conn, a, "late", "late", (1, 4))
    m, v = state(conn, pid)
    conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, 500000, 1e-3, p_weight_decay => 0)",
                 (pid, put(conn, g, (1, 4)), m, v))
    m_ref, v_ref = 0.1 * g.astype(np.float64), 0.001 * g.astype(np.float64) ** 2
    np.testing.assert_allclose(get(conn, pid), a - 1e-3 * m_ref / (np.sqrt(v_ref) + 1e-8), rtol=1e-5, atol=1e-6)


# ---- optimizer state and zero utilities ---------------------------------------------------------------------

def test_adamw_state(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    a = rng.standard_normal((37, 50)).astype(np.float32)
    pid = param(conn, a, "h.0.attn.c_attn.weight", "state", (16, 16))
    m, v = state(conn, pid)
    rows = conn.execute("SELECT id, model, name, role, shape, tile FROM llm_tensor WHERE id IN (%s, %s) ORDER BY role",
                        (m, v)).fetchall()
    assert rows == [(m, "state", "h.0.attn.c_attn.weight", "adam_m", [37, 50], [16, 16]),
                    (v, "state", "h.0.attn.c_attn.weight", "adam_v", [37, 50], [16, 16])]
    assert m > 0 and v > 0
    assert not get(conn, m).any() and not get(conn, v).any()
    conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, 1, 1e-3)", (pid, put(conn, a, (16, 16)), m, v))
    assert state(conn, pid) == (m, v), "existing state is returned, not recreated"
    assert get(conn, m).any(), "and not reset"


def test_adamw_state_errors(conn: psycopg.Connection) -> None:
    scratch = put(conn, np.ones((5, 7)), (4, 4), name="act")
    refused(conn, r'pg_llm: adamw_state: tensor "act" \(id -?\d+\) has role activation, expected a durable param',
            "SELECT * FROM llm_internal.llm_adamw_state(%s)", scratch)
    g = write_tensor(conn, np.ones((5, 7)), "w", model="errs", role="grad", tile=(4, 4))
    refused(conn, "pg_llm: adamw_state: .* has role grad", "SELECT * FROM llm_internal.llm_adamw_state(%s)", g)
    refused(conn, r"pg_llm: adamw_state: input param \(tensor id 999999\) does not exist",
            "SELECT * FROM llm_internal.llm_adamw_state(999999)")
    pid = param(conn, np.ones((5, 7)), "w", "errs", (4, 4))
    call(conn, "SELECT llm_tensor_create('w', ARRAY[7, 5], ARRAY[4, 4], 'adam_v', 'errs')")
    refused(conn, r'pg_llm: adamw_state: adam_v tensor "w" \(id \d+\) has shape \(7, 5\) tile \{4,4\}, expected shape '
            r'\(5, 7\) tile \{4,4\} \(those of param "w"\)', "SELECT * FROM llm_internal.llm_adamw_state(%s)", pid)


def test_tensor_zero_and_zeros_like(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    a = rng.standard_normal((37, 50)).astype(np.float32)
    tid = put(conn, a, (16, 16), name="z")
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 2 AND tc = 3", (tid,))
    assert call(conn, "SELECT llm_internal.llm_tensor_zero(%s)", tid) == tid
    assert get(conn, tid).shape == (37, 50) and not get(conn, tid).any()  # missing tile recreated, ragged
    conn.execute("SELECT llm_tensor_validate(%s)", (tid,))
    b = rng.standard_normal(21).astype(np.float32)
    src = param(conn, b, "bias", "zeros", (1, 8))
    like = call(conn, "SELECT llm_internal.llm_tensor_zeros_like(%s)", src)
    assert like < 0
    assert conn.execute("SELECT name, role, model, shape, tile FROM llm_tensor WHERE id = %s",
                        (like,)).fetchone() == ("bias", "activation", "zeros", [21], [1, 8])
    close(get(conn, like), np.zeros(21))
    m = call(conn, "SELECT llm_internal.llm_tensor_zeros_like(%s, 'adam_m')", src)
    assert m > 0 and call(conn, "SELECT llm_tensor('zeros', 'bias', 'adam_m')") == m
    grad = call(conn, "SELECT llm_internal.llm_tensor_zeros_like(%s, 'grad')", src)
    assert call(conn, "SELECT role FROM llm_tensor WHERE id = %s", grad) == "grad"
    conn.execute("SELECT llm_model_create('zeros2')")
    other = call(conn, "SELECT llm_internal.llm_tensor_zeros_like(%s, 'param', 'bias2', 'zeros2')", src)
    assert call(conn, "SELECT llm_tensor('zeros2', 'bias2')") == other
    refused(conn, r'pg_llm: zeros_like: tensor "bias" \(role adam_m\) of model "zeros" already exists \(id \d+\)',
            "SELECT llm_internal.llm_tensor_zeros_like(%s, 'adam_m')", src)
    refused(conn, r"pg_llm: tensor_zero: input tensor \(tensor id 999999\) does not exist",
            "SELECT llm_internal.llm_tensor_zero(999999)")


# ---- errors: clear messages, nothing written ----------------------------------------------------------------

def test_errors_write_nothing(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    pid = param(conn, rng.standard_normal((5, 7)), "w", "bad", (4, 4))
    m, v = state(conn, pid)
    g = put(conn, rng.standard_normal((5, 7)), (4, 4), name="g")
    hyper = {"p_step": 1, "p_lr": 1e-3}

    def bad(match: str, **kw: object) -> None:
        args = {**hyper, **kw}
        named = ", ".join(f"{k} => %s" for k in args)
        refused(conn, match, f"SELECT llm_adamw_step(%s, %s, %s, %s, {named})", pid, g, m, v, *args.values())

    bad(r"pg_llm: adamw: step must be >= 1 \(the first optimizer step is 1\), got 0", p_step=0)
    bad("pg_llm: adamw: step must be >= 1", p_step=None)
    bad("pg_llm: adamw: lr must be finite and >= 0, got -0.1", p_lr=-0.1)
    bad("pg_llm: adamw: lr must be finite and >= 0, got NaN", p_lr=float("nan"))
    bad(r"pg_llm: adamw: beta1 must be in \[0, 1\), got 1", p_beta1=1.0)
    bad(r"pg_llm: adamw: beta2 must be in \[0, 1\), got <NULL>", p_beta2=None)
    bad("pg_llm: adamw: eps must be finite and >= 0, got -1e-08", p_eps=-1e-8)
    bad("pg_llm: adamw: weight_decay must be finite and >= 0, got Infinity", p_weight_decay=float("inf"))
    bad("pg_llm: adamw: grad_scale must be finite and >= 0, got NaN .*skip the step", p_grad_scale=float("nan"))
    refused(conn, r"pg_llm: adamw: param, grad, m and v must be four different tensors",
            "SELECT llm_adamw_step(%s, %s, %s, %s, 1, 1e-3)", pid, g, m, m)
    refused(conn, r"pg_llm: adamw: input grad \(tensor id 999999\) does not exist",
            "SELECT llm_adamw_step(%s, 999999, %s, %s, 1, 1e-3)", pid, m, v)
    g2 = put(conn, np.ones((5, 6)), (4, 4), name="g2")
    refused(conn, r'pg_llm: adamw: grad "g2" has shape \(5, 6\), expected \(5, 7\) \(the shape of param "w"\)',
            "SELECT llm_adamw_step(%s, %s, %s, %s, 1, 1e-3)", pid, g2, m, v)
    m2 = put(conn, np.zeros((5, 7)), (2, 4), name="m2")
    refused(conn, r'pg_llm: adamw: param "w" and m "m2" \(shape \(5, 7\)\) are cut in tiles of \{4,4\} and \{2,4\}',
            "SELECT llm_adamw_step(%s, %s, %s, %s, 1, 1e-3)", pid, g, m2, v)
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 1 AND tc = 1", (v,))
    refused(conn, r'pg_llm: adamw: updated 9 of the 12 tiles of param "w", m and v: a tensor is missing tiles',
            "SELECT llm_adamw_step(%s, %s, %s, %s, 1, 1e-3)", pid, g, m, v)
