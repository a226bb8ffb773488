"""The fused training block and head (ops/gpt2_block.py, ops/head_nll.py) against torch autograd in float64, on a
ragged shape (3 heads of 16, two sequences of 37 rows, 16 x 16 tiles cutting every tensor unevenly): forward,
dx and all 12 parameter gradients; dropout reproducible per seed and its backward consistent with its forward."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import torch

from pg_llm.kernels.block_train import BlockArgs, block_backward, block_forward

from conftest import close
from helpers import call, get, param, put

B, T, H, C = 2, 37, 3, 48
SHAPES = [(1, C), (1, C), (C, 3 * C), (1, 3 * C), (C, C), (1, C), (1, C), (1, C), (C, 4 * C), (1, 4 * C),
          (4 * C, C), (1, C)]
NAMES = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
         "mlp.c_proj.bias"]
BLOCK = "llm_internal.llm_gpt2_block(%s, %s, 3, 37, 1e-5, %s, ARRAY[11, 12, 13]::BIGINT[], ARRAY[16, 16])"


@pytest.fixture(scope="module")
def weights(conn: psycopg.Connection) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(5)
    w = [(rng.standard_normal(s) * 0.2 + (1.0 if n.startswith("ln_") and n.endswith("weight") else 0.0))
         .astype(np.float32) for s, n in zip(SHAPES, NAMES, strict=True)]
    ids = [param(conn, a.reshape(-1) if a.shape[0] == 1 else a, f"h.0.{n}", "blk", tile=(16, 16))
           for a, n in zip(w, NAMES, strict=True)]
    return w, ids


def torch_block(x: np.ndarray, w: list[np.ndarray]):
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tw = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in w]

    def ln(z, g, b):
        return torch.nn.functional.layer_norm(z, (C,), g[0], b[0], 1e-5)

    def att(qkv):
        q, k, v = qkv.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.permute(0, 2, 1, 3).reshape(B * T, C)
    a = tx + att(ln(tx, tw[0], tw[1]) @ tw[2] + tw[3]) @ tw[4] + tw[5]
    h = torch.nn.functional.gelu(ln(a, tw[6], tw[7]) @ tw[8] + tw[9], approximate="tanh")
    return tx, tw, a + h @ tw[10] + tw[11]


def test_block_equals_torch(conn: psycopg.Connection, weights, rng: np.random.Generator) -> None:
    w, ids = weights
    x = rng.standard_normal((B * T, C)).astype(np.float32)
    dy = rng.standard_normal((B * T, C)).astype(np.float32)
    ix, idy = put(conn, x, (16, 16)), put(conn, dy, (16, 16))
    y = get(conn, call(conn, f"SELECT {BLOCK}", ix, ids, 0.0))
    grads = call(conn, "SELECT llm_internal.llm_gpt2_block_backward(ARRAY[%s]::BIGINT[], %s, %s, 3, 37, 1e-5, 0, "
                       "ARRAY[11, 12, 13]::BIGINT[], ARRAY[16, 16])", ix, idy, ids)
    tx, tw, ty = torch_block(x, w)
    ty.backward(torch.tensor(dy, dtype=torch.float64))
    close(y, ty.detach().numpy())
    close(get(conn, grads[0]), tx.grad.numpy())
    for n, g, t in zip(NAMES, grads[1:], tw, strict=True):
        got, want = get(conn, g), t.grad.numpy().reshape(-1) if t.shape[0] == 1 else t.grad.numpy()
        assert got.shape == want.shape, n
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), n


def test_dropout_reproducible_and_differentiable(conn: psycopg.Connection, weights, rng: np.random.Generator) -> None:
    w, ids = weights
    x = rng.standard_normal((B * T, C)).astype(np.float32)
    ix = put(conn, x, (16, 16))
    y1, y2 = (get(conn, call(conn, f"SELECT {BLOCK}", ix, ids, 0.3)) for _ in range(2))
    y0 = get(conn, call(conn, f"SELECT {BLOCK}", ix, ids, 0.0))
    assert (y1 == y2).all() and not np.allclose(y1, y0)
    k = BlockArgs(H, T, 1e-5, 0.3, (11, 12, 13), (16, 16))
    assert (block_forward(x, w, k)[0] == y1).all()  # the server runs this very function
    dy = rng.standard_normal((B * T, C)).astype(np.float32)
    dx, _ = block_backward(x, dy, w, k)
    d = rng.standard_normal(x.shape).astype(np.float32)
    eps = 1e-2

    def f(z: np.ndarray) -> float:
        return float((block_forward(z.astype(np.float32), w, k)[0].astype(np.float64) * dy).sum())
    fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
    assert abs(fd - float((dx * d).sum())) <= 1e-2 * max(1.0, abs(fd))


@pytest.mark.parametrize("shared", [False, True])
def test_tape_runs_of_blocks(conn: psycopg.Connection, weights, rng: np.random.Generator, shared: bool) -> None:
    """Two recorded blocks y1 = block(x), y2 = block(y1): llm_backward runs their backward as one call (the run)
    and gets block_backward's gradients chained; when y1 also feeds another op (z = y1 + y2) the run stops at
    y2's block and y1 gets both contributions."""
    w, ids = weights
    x = rng.standard_normal((B * T, C)).astype(np.float32)
    dz = rng.standard_normal((B * T, C)).astype(np.float32)
    k0, k1 = (BlockArgs(H, T, 1e-5, 0.1, s, (16, 16)) for s in ((1, 2, 3), (4, 5, 6)))
    with conn.transaction():
        tape = call(conn, "SELECT llm_scratch_mark()")
        ix = put(conn, x, (16, 16))
        rec = ("SELECT llm_internal.llm_t_gpt2_block(%s, %s, %s, 3, 37, 1e-5, 0.1, %s::BIGINT[], ARRAY[16, 16])")
        y1 = call(conn, rec, tape, ix, ids, [1, 2, 3])
        y2 = call(conn, rec, tape, y1, ids, [4, 5, 6])
        root = call(conn, "SELECT llm_internal.llm_t_add(%s, %s, %s)", tape, y1, y2) if shared else y2
        conn.execute("SELECT llm_internal.llm_backward(%s, %s, %s)", (tape, root, put(conn, dz, (16, 16))))
        dx = get(conn, call(conn, "SELECT llm_internal.llm_grad_of(%s, %s)", tape, ix))
        calls = call(conn, "SELECT count(*) FROM llm_tensor WHERE id < %s AND name = 'gpt2_block.dx'", tape)
        conn.execute("SELECT llm_scratch_release(%s)", (tape,))
    h1, _ = block_forward(x, w, k0)
    d1, _ = block_backward(h1, dz, w, k1)
    if shared:
        d1 = d1 + dz
    want, _ = block_backward(x, d1, w, k0)
    close(dx, want)
    assert calls == (2 if shared else 1)  # one dx per backward call: a run of two blocks is one call


@pytest.mark.parametrize("with_ln", [False, True], ids=["head", "ln_f+head"])
def test_head_nll_equals_torch(conn: psycopg.Connection, rng: np.random.Generator, with_ln: bool) -> None:
    V, N = 301, B * T
    x = rng.standard_normal((N, C)).astype(np.float32)
    head = (rng.standard_normal((V, C)) * 0.3).astype(np.float32)
    g, b = (1 + 0.2 * rng.standard_normal(C)).astype(np.float32), (0.2 * rng.standard_normal(C)).astype(np.float32)
    tgt = rng.integers(0, V, N)
    ix, ih = put(conn, x, (16, 16)), param(conn, head, "wte.weight", "blk", tile=(16, 16), replace=True)
    ln = [param(conn, a, n, "blk", tile=(16, 16), replace=True) for a, n in ((g, "ln_f.weight"), (b, "ln_f.bias"))]
    loss, dx, dh, dln = conn.execute("SELECT loss, dx, dhead, dln FROM llm_internal.llm_head_nll(%s, %s, %s, 0.5, "
                                     "NULL, %s, 1e-5)", (ix, ih, tgt.tolist(), ln if with_ln else None)).fetchone()
    tx, th, tg, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, head, g, b))
    h = torch.nn.functional.layer_norm(tx, (C,), tg, tb, 1e-5) if with_ln else tx
    ref = torch.nn.functional.cross_entropy(h @ th.T, torch.tensor(tgt))
    (0.5 * ref).backward()
    assert abs(loss - ref.item()) <= 1e-6 * ref.item()
    close(get(conn, dx), tx.grad.numpy())
    close(get(conn, dh), th.grad.numpy())
    assert (dln is not None) is with_ln
    if with_ln:
        close(get(conn, dln[0]), tg.grad.numpy())
        close(get(conn, dln[1]), tb.grad.numpy())


@pytest.mark.parametrize("args, msg", [
    ("%s, ARRAY[1, 2]::BIGINT[], 3, 37, 1e-5, 0, ARRAY[1, 2, 3]::BIGINT[], ARRAY[16, 16]", "12 parameter ids"),
    ("%s, %s, 5, 37, 1e-5, 0, ARRAY[1, 2, 3]::BIGINT[], ARRAY[16, 16]", "does not fit n_head 5"),
    ("%s, %s, 3, 36, 1e-5, 0, ARRAY[1, 2, 3]::BIGINT[], ARRAY[16, 16]", "seq_len 36"),
    ("%s, %s, 3, 37, 1e-5, 1, ARRAY[1, 2, 3]::BIGINT[], ARRAY[16, 16]", "dropout must be in"),
])
def test_errors(conn: psycopg.Connection, weights, args: str, msg: str) -> None:
    ix = put(conn, np.zeros((B * T, C), np.float32), (16, 16))
    vals = (ix,) if args.count("%s") == 1 else (ix, weights[1])
    with pytest.raises(psycopg.errors.RaiseException, match=msg):
        conn.execute(f"SELECT llm_internal.llm_gpt2_block({args})", vals)


@pytest.mark.parametrize("lo, hi", [(0, 1), (1, 3), (2, 5), (0, 5)])
def test_rows_of_a_batch_get_the_batch_masks(lo: int, hi: int) -> None:
    """A data-parallel rank's rows (whole sequences lo .. hi-1 of 5, the residual masks' tiles of 16 rows cut
    across sequences of 37): the block's output and every gradient equal the whole batch's rows, dropout on."""
    rng = np.random.default_rng(7)
    w = [(rng.standard_normal(s) * 0.2).astype(np.float32) for s in SHAPES]
    x = rng.standard_normal((5 * T, C)).astype(np.float32)
    dy = rng.standard_normal((5 * T, C)).astype(np.float32)
    whole = BlockArgs(H, T, 1e-5, 0.3, (11, 12, 13), (16, 16))
    part = BlockArgs(H, T, 1e-5, 0.3, (11, 12, 13), (16, 16), lo * T)
    rows = slice(lo * T, hi * T)
    y, _ = block_forward(x, w, whole)
    y_part, _ = block_forward(x[rows], w, part)
    # not bit for bit: BLAS blocks a matmul of fewer rows differently (1-ulp differences); a wrong mask would
    # zero or scale whole entries
    np.testing.assert_allclose(y_part, y[rows], rtol=1e-5, atol=1e-5)
    dx_part, g_part = block_backward(x[rows], dy[rows], w, part)
    dy_masked = dy.copy()
    dy_masked[:lo * T] = 0
    dy_masked[hi * T:] = 0
    dx, g = block_backward(x, dy_masked, w, whole)  # rows outside the share contribute nothing
    np.testing.assert_allclose(dx_part, dx[rows], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_part, g, strict=True):  # float32 sums over other row counts
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
