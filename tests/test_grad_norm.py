"""Squared norms, the global gradient norm and the clip coefficient against torch.nn.utils.clip_grad_norm_
(returned norm and clipped gradients), clipping through llm_adamw_step's grad_scale, and errors."""
from __future__ import annotations

import math

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels.grad_norm import sq_sum_tile

from conftest import close
from helpers import call, get, param, put

SHAPES = [((37, 50), (16, 16)), ((21,), (1, 8)), ((3, 300), (256, 256)), ((5, 7), (4, 4))]


def grads(rng: np.random.Generator, scale: float = 0.3) -> list[np.ndarray]:
    return [(scale * rng.standard_normal(shape)).astype(np.float32) for shape, _ in SHAPES]


def put_all(conn: psycopg.Connection, arrays: list[np.ndarray]) -> list[int]:
    return [put(conn, a, tile, name=f"g{i}") for i, (a, (_, tile)) in enumerate(zip(arrays, SHAPES, strict=True))]


def torch_clip(arrays: list[np.ndarray], max_norm: float) -> tuple[float, list[np.ndarray]]:
    ts = [torch.zeros(a.shape, requires_grad=True) for a in arrays]
    for t, a in zip(ts, arrays, strict=True):
        t.grad = torch.tensor(a)
    total = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    return float(total), [t.grad.numpy() for t in ts]


def test_microkernel_in_numpy(rng: np.random.Generator) -> None:
    a = rng.standard_normal((7, 9)).astype(np.float32)
    assert sq_sum_tile(a.tobytes()) == pytest.approx(float((a.astype(np.float64) ** 2).sum()), rel=1e-14)
    assert sq_sum_tile(b"") == 0.0


def test_sq_norm(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    for a, tid in zip(arrs := grads(rng, 3.0), put_all(conn, arrs), strict=True):
        want = float((a.astype(np.float64) ** 2).sum())
        assert call(conn, "SELECT llm_internal.llm_sq_norm(%s)", tid) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e6])
def test_matches_clip_grad_norm(conn: psycopg.Connection, rng: np.random.Generator, max_norm: float) -> None:
    arrays = grads(rng)
    ids = put_all(conn, arrays)
    total, clipped = torch_clip(arrays, max_norm)
    norm = call(conn, "SELECT llm_global_grad_norm(%s)", ids)
    assert norm == pytest.approx(total, rel=1e-6)
    coef = call(conn, "SELECT llm_clip_coef(%s, %s)", norm, max_norm)
    assert coef == pytest.approx(min(1.0, max_norm / (total + 1e-6)), rel=1e-6)
    assert (coef < 1) == (max_norm < total)
    for tid, want in zip(ids, clipped, strict=True):
        close(get(conn, call(conn, "SELECT llm_scale(%s, %s)", tid, coef)), want)


def test_clip_coef_edges(conn: psycopg.Connection) -> None:
    def coef(norm: float | None, max_norm: float | None) -> float | None:
        return call(conn, "SELECT llm_clip_coef(%s, %s)", norm, max_norm)

    assert coef(10.0, 0.0) == 1.0  # max_norm 0 (or NULL, or negative) disables clipping
    assert coef(10.0, None) == 1.0
    assert coef(10.0, -1.0) == 1.0
    assert coef(0.0, 1.0) == 1.0
    assert coef(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6), rel=1e-15)
    assert math.isnan(coef(float("nan"), 1.0))
    assert math.isnan(coef(float("inf"), 1.0))
    assert coef(None, 1.0) is None
    assert call(conn, "SELECT provolatile FROM pg_proc WHERE proname = 'llm_clip_coef'") == "i"


def test_empty_and_repeated(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    assert call(conn, "SELECT llm_global_grad_norm(ARRAY[]::BIGINT[])") == 0.0
    assert float(torch.nn.utils.clip_grad_norm_([], 1.0)) == 0.0
    a = grads(rng)[0]
    tid = put(conn, a, (16, 16))
    one = call(conn, "SELECT llm_global_grad_norm(%s)", [tid])
    assert call(conn, "SELECT llm_global_grad_norm(%s)", [tid, tid]) == pytest.approx(math.sqrt(2) * one, rel=1e-12)


def test_clip_then_adamw_matches_torch(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """clip_grad_norm_(params, 1.0) then AdamW.step() == llm_clip_coef(llm_global_grad_norm) as grad_scale."""
    init = grads(rng, 1.0)
    ids = [param(conn, a, f"w{i}", "clip", tile)
           for i, (a, (_, tile)) in enumerate(zip(init, SHAPES, strict=True))]
    states = [conn.execute("SELECT m_id, v_id FROM llm_internal.llm_adamw_state(%s)", (pid,)).fetchone() for pid in ids]
    tp = [torch.tensor(a, requires_grad=True) for a in init]
    opt = torch.optim.AdamW(tp, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in (1, 2, 3):
        g = grads(rng, 0.5)
        for t, a in zip(tp, g, strict=True):
            t.grad = torch.tensor(a)
        total = float(torch.nn.utils.clip_grad_norm_(tp, 1.0))
        opt.step()
        gids = put_all(conn, g)
        norm = call(conn, "SELECT llm_global_grad_norm(%s)", gids)
        assert norm == pytest.approx(total, rel=1e-6)
        coef = call(conn, "SELECT llm_clip_coef(%s, 1.0)", norm)
        assert coef < 1
        for pid, gid, (m, v) in zip(ids, gids, states, strict=True):
            conn.execute("SELECT llm_adamw_step(%s, %s, %s, %s, %s, 1e-2, p_weight_decay => 0.1, "
                         "p_grad_scale => %s)", (pid, gid, m, v, step, coef))
        for pid, t in zip(ids, tp, strict=True):
            np.testing.assert_allclose(get(conn, pid), t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_errors(conn: psycopg.Connection) -> None:
    a = put(conn, np.ones((5, 7)), (4, 4), name="a")
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s AND tr = 1 AND tc = 0", (a,))
    with pytest.raises(psycopg.errors.RaiseException, match=r'pg_llm: sq_norm: tensor "a" \(id -?\d+\) has 3 of its 4 '
                       r"tiles"):
        conn.execute("SELECT llm_internal.llm_sq_norm(%s)", (a,))
    with pytest.raises(psycopg.errors.RaiseException, match=r"pg_llm: sq_norm: input tensor \(tensor id 999999\) "
                       "does not exist"):
        conn.execute("SELECT llm_global_grad_norm(ARRAY[999999]::BIGINT[])")
    with pytest.raises(psycopg.errors.RaiseException, match="pg_llm: global_grad_norm: tensor ids must not be NULL"):
        conn.execute("SELECT llm_global_grad_norm(NULL)")
    with pytest.raises(psycopg.errors.RaiseException, match="pg_llm: global_grad_norm: tensor ids must not be NULL"):
        conn.execute("SELECT llm_global_grad_norm(ARRAY[%s, NULL]::BIGINT[])", (a,))
