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
