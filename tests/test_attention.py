"""Fused causal multi-head attention forward/backward against torch (float64 autograd)."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from conftest import close
from helpers import call, get, put


def torch_attention(qkv: torch.Tensor, n_head: int, T: int) -> torch.Tensor:
    rows, cols = qkv.shape
    C = cols // 3
    B = rows // T
    q, k, v = qkv.view(B, T, 3 * C).split(C, dim=2)
    q, k, v = (z.reshape(B, T, n_head, C // n_head).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / np.sqrt(C // n_head)
    att = att.masked_fill(torch.tril(torch.ones(T, T, dtype=torch.bool)).logical_not(), float("-inf"))
    y = torch.softmax(att, dim=-1) @ v
    return y.transpose(1, 2).reshape(rows, C)


@pytest.mark.parametrize("B,T,C,H,tile", [(1, 7, 12, 3, (4, 8)), (2, 13, 48, 4, (16, 16)), (3, 5, 30, 2, (256, 256)),
                                          (1, 37, 48, 3, (16, 32))])
def test_forward_and_backward(conn: psycopg.Connection, rng: np.random.Generator, B: int, T: int, C: int, H: int,
                              tile: tuple[int, int]) -> None:
    qkv = rng.standard_normal((B * T, 3 * C)).astype(np.float32)
    dy = rng.standard_normal((B * T, C)).astype(np.float32)
    tq = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    ty = torch_attention(tq, H, T)
    ty.backward(torch.tensor(dy, dtype=torch.float64))
    iq = put(conn, qkv, tile)
    y = call(conn, "SELECT llm_attention(%s, %s, %s)", iq, H, T)
    close(get(conn, y), ty.detach().numpy())
    otile = conn.execute("SELECT tile FROM llm_tensor WHERE id = %s", (y,)).fetchone()[0]
    idy = put(conn, dy, tuple(otile))
    dq = call(conn, "SELECT llm_attention_backward(%s, %s, %s, %s)", iq, idy, H, T)
    close(get(conn, dq), tq.grad.numpy())


def test_errors(conn: psycopg.Connection) -> None:
    q = put(conn, np.ones((6, 12), np.float32), (4, 4))
    with pytest.raises(psycopg.errors.RaiseException, match="divisible by n_head = 3"):
        conn.execute("SELECT llm_attention(%s, 3, 3)", (q,))
    with pytest.raises(psycopg.errors.RaiseException, match="not a whole number of sequences of 4"):
        conn.execute("SELECT llm_attention(%s, 2, 4)", (q,))


def test_dropout_on_probabilities(conn: psycopg.Connection, rng: np.random.Generator) -> None:
    """Dropout on attention probabilities: reproducible per seed, and backward consistent with forward
    (checked by a directional finite difference in float64 of the same masked function)."""
    from pg_llm.kernels.attention import attention_backward, attention_forward

    B, T, C, H = 2, 9, 12, 3
    qkv = rng.standard_normal((B * T, 3 * C)).astype(np.float32)
    iq = put(conn, qkv, (256, 256))
    y1 = get(conn, call(conn, "SELECT llm_attention(%s, %s, %s, NULL, 0.3, 7)", iq, H, T))
    y2 = get(conn, call(conn, "SELECT llm_attention(%s, %s, %s, NULL, 0.3, 7)", iq, H, T))
    y3 = get(conn, call(conn, "SELECT llm_attention(%s, %s, %s, NULL, 0.3, 8)", iq, H, T))
    y0 = get(conn, call(conn, "SELECT llm_attention(%s, %s, %s)", iq, H, T))
    assert (y1 == y2).all() and not (y1 == y3).all() and not (y1 == y0).all()

    def f(x: np.ndarray) -> np.ndarray:  # the masked forward in float64 via the same microkernel
        out = attention_forward([x.astype(np.float32).tobytes()], B * T, 3 * C, B * T, 3 * C, H, T, 0.3, 7)
        return np.frombuffer(out[0], "<f4").reshape(B * T, C).astype(np.float64)

    dy = rng.standard_normal((B * T, C))
    g = np.frombuffer(attention_backward([qkv.tobytes()], [dy.astype(np.float32).tobytes()], B * T, 3 * C,
                                     B * T, 3 * C, H, T, 0.3, 7)[0], "<f4").reshape(B * T, 3 * C)
    d = rng.standard_normal(qkv.shape).astype(np.float32)
    eps = 1e-2
    fd = ((f(qkv + eps * d) - f(qkv - eps * d)) * dy).sum() / (2 * eps)
    assert abs(fd - (g * d).sum()) <= 1e-2 * max(1.0, abs(fd))
