"""The fused GPT-2 block for training (the SQL side: py/ops/gpt2_block.py): forward, and a backward that recomputes
the block's intermediates from its input instead of storing them, so a training step keeps one (B*T, C) tensor per
block (its input) instead of every activation, and a block costs one PL/Python call forward (the backward of
all blocks is one more) instead of ~30 kernel calls.

    a = x + dropout(attn.c_proj(attention(attn.c_attn(ln_1(x)))))      (nanoGPT's block, dropout at GPT-2's sites)
    y = a + dropout(mlp.c_proj(gelu(mlp.c_fc(ln_2(a)))))

The forward is the one GPT-2 block (block_step.gpt2_block, also inference's) with causal_attention (dropout masks per
sequence and query block) and the residual dropout of the chain's tiles (dropout_rows with the tiling of the
c_proj output: x's tile rows, c_proj.weight's tile columns).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pg_llm.kernels.attention import causal_attention, causal_attention_backward
from pg_llm.kernels.block_step import block_shapes, gpt2_block
from pg_llm.kernels.dropout import dropout_rows
from pg_llm.kernels.gelu import gelu_backward
from pg_llm.kernels.held import emit_grad, holds_any, keep_acts, take_acts
from pg_llm.kernels.layernorm import layernorm_backward_rows
from pg_llm.kernels.matmul import read_tiles
from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import F32, block, cut, whole
from pg_llm.kernels.weight_cache import cache_budget, cached_tensors


@dataclass(frozen=True)
class BlockArgs:
    n_head: int
    seq_len: int
    eps: float
    rate: float  # dropout at the attention probabilities and both residual branches
    seeds: tuple[int, int, int]  # the sites h.i.attn, h.i.attn.resid, h.i.mlp.resid
    drop_tile: tuple[int, int]  # the residual dropout's tiling (the chain's c_proj output tiles)
    row0: int = 0  # the rows are rows row0.. of the whole batch (a data-parallel rank's share): the masks follow


def _drop(a: np.ndarray, k: BlockArgs, site: int) -> np.ndarray:
    return dropout_rows(a, k.rate, k.seeds[site], *k.drop_tile, k.row0) if k.rate > 0 else a


def _attention(qkv: np.ndarray, k: BlockArgs) -> np.ndarray:
    return causal_attention(qkv, k.n_head, k.seq_len, k.rate, k.seeds[0], k.row0 // k.seq_len)


def block_forward(x: np.ndarray, w: Sequence[np.ndarray], k: BlockArgs, keep: bool = False) -> tuple[np.ndarray, dict]:
    """y (N, C) of one block over rows x (sequences of k.seq_len): gpt2_block with causal_attention and the
    dropout sites, and (keep=True) the intermediates the backward needs."""
    saved: dict = {}
    y = gpt2_block(x, w, k.eps, lambda qkv: _attention(qkv, k),
                   lambda a, site: _drop(a, k, site), saved if keep else None)
    return y, saved


def _undrop(d: np.ndarray, k: BlockArgs, site: int) -> np.ndarray:
    """The gradient through a dropout site: the same mask and scale (dropout is linear in its input)."""
    return _drop(d, k, site)


def _colsum(d: np.ndarray) -> np.ndarray:
    return d.sum(axis=0, dtype=np.float64).astype(F32).reshape(1, -1)


def block_backward(x: np.ndarray, dy: np.ndarray, w: Sequence[np.ndarray], k: BlockArgs,
                   s: dict | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(dx, the 12 parameter gradients in BLOCK_PARAMS order) of block_forward at x for the output gradient dy,
    with the forward's intermediates s (block_forward's keep), recomputed when not given (consumed)."""
    ln1g, ln1b, wqkv, bqkv, wo, bo, ln2g, ln2b, wfc, bfc, wp, bp = w
    if s is None:
        _, s = block_forward(x, w, k, keep=True)
    dm = _undrop(dy, k, 2)
    dwp, dbp = np.matmul(s['g'].T, dm), _colsum(dm)
    df = gelu_backward(s['f'], np.matmul(dm, wp.T))
    del dm, s['g']
    dwfc, dbfc = np.matmul(s['h2'].T, df), _colsum(df)
    dh2 = np.matmul(df, wfc.T)
    del df, s['f']
    da, dln2g, dln2b = layernorm_backward_rows(s['a'], dh2, ln2g, k.eps)
    da += dy
    do = _undrop(da, k, 1)
    dwo, dbo = np.matmul(s['att'].T, do), _colsum(do)
    dqkv = causal_attention_backward(s['qkv'], np.matmul(do, wo.T), k.n_head, k.seq_len, k.rate, k.seeds[0],
                                     k.row0 // k.seq_len)
    del do
    dwqkv, dbqkv = np.matmul(s['h1'].T, dqkv), _colsum(dqkv)
    dx, dln1g, dln1b = layernorm_backward_rows(x, np.matmul(dqkv, wqkv.T), ln1g, k.eps)
    dx += da
    grads = [dln1g.reshape(1, -1), dln1b.reshape(1, -1), dwqkv, dbqkv, dwo, dbo, dln2g.reshape(1, -1),
             dln2b.reshape(1, -1), dwfc, dbfc, dwp, dbp]
    return dx, grads


# ---- PL/Python entry points ----------------------------------------------------------------------------------

def _weights(plpy: Any, GD: dict, params: Sequence[int], cols: int, op: str) -> list[np.ndarray]:
    """A block's 12 parameters from the weight cache, checked to fit rows of `cols` values."""
    if len(params) != 12:
        error('pg_llm: %s: %d parameter ids, expected the 12 of a block' % (op, len(params)))
    w = cached_tensors(plpy, GD, params, block, cache_budget(plpy, GD))
    bad = block_shapes(w, cols)
    if bad:
        i, got, want = bad[0]
        error('pg_llm: %s: parameter %d (tensor id %s) has shape %s, expected %s for rows of %d values'
              % (op, i, params[i], got, want, cols))
    return w


def _args(n_head: int, seq_len: int, eps: float, rate: float, seeds: Sequence[int], drop_tile: Sequence[int],
          rows: int, cols: int, op: str) -> BlockArgs:
    row0 = drop_tile[2] if len(drop_tile) == 3 else 0
    if n_head < 1 or cols % n_head or seq_len < 1 or rows % seq_len or len(seeds) != 3 \
            or len(drop_tile) not in (2, 3) or row0 < 0 or row0 % seq_len:
        error('pg_llm: %s: %d rows of %d values from row %d do not fit n_head %d, seq_len %d (with 3 seeds, a tile '
              'of 2 values and an optional first row)' % (op, rows, cols, row0, n_head, seq_len))
    return BlockArgs(n_head, seq_len, eps, rate, tuple(seeds), (drop_tile[0], drop_tile[1]), row0)


def forward_kernel(plpy: Any, GD: dict, tiles: Sequence[bytes], geom: Sequence[int], params: Sequence[int],
                   n_head: int, seq_len: int, eps: float, rate: float, seeds: Sequence[int],
                   drop_tile: Sequence[int], x_id: int) -> list[bytes]:
    """llm_mk_gpt2_block: y's tiles (x's tiling, (tr, tc) order) from x's tiles (tensor x_id) and the block's
    cached weights; the intermediates kept for the backward when a training step holds them (held.keep_acts)."""
    x = whole(tiles, *geom, 'gpt2_block')
    w = _weights(plpy, GD, params, geom[1], 'gpt2_block')
    k = _args(n_head, seq_len, eps, rate, seeds, drop_tile, geom[0], geom[1], 'gpt2_block')
    y, saved = block_forward(x, w, k, keep=holds_any(GD))
    if saved:
        keep_acts(plpy, GD, x_id, saved)
    return [t for _, _, t in cut(y, geom[2], geom[3])]


def backward_kernel(plpy: Any, GD: dict, xs: Sequence[int], dy_tiles: Sequence[bytes], geom: Sequence[int],
                    params: Sequence[int], n_head: int, seq_len: int, eps: float, rate: float, seeds: Sequence[int],
                    drop_tile: Sequence[int], grad_tiles: Sequence[int], tape: int,
                    grad_ids: Sequence[int]) -> Iterator[tuple[int, int, int, bytes]]:
    """llm_mk_gpt2_block_backward over a run of n blocks (inputs: tensors xs, first block first; dy: the last
    block's output gradient): (k, tr, tc, data) rows, k = 1..12n the parameters' gradients (parameter k cut in
    tiles grad_tiles[2k - 2 : 2k]), last block first, then k = 0 the first block's dx (x's tiling). Each block's
    input is read when its turn comes (one block's intermediates in memory at a time); the gradient passed
    between blocks stays in memory. When the tape holds its gradients (held.py), the parameters' are kept under
    grad_ids (in p_params order) instead of returned."""
    n = len(xs)
    if len(params) != 12 * n or len(seeds) != 3 * n or len(grad_tiles) != 24 * n:
        error('pg_llm: gpt2_block_backward: %d inputs, %d parameter ids, %d seeds, %d gradient tile sizes'
              % (n, len(params), len(seeds), len(grad_tiles)))
    rows, cols, th, tw = geom
    dy = whole(dy_tiles, rows, cols, th, tw, 'gpt2_block_backward')
    box = [0, -(-rows // th), 0, -(-cols // tw)]
    for j in reversed(range(n)):
        k = _args(n_head, seq_len, eps, rate, seeds[3 * j:3 * j + 3], drop_tile, rows, cols, 'gpt2_block_backward')
        w = _weights(plpy, GD, params[12 * j:12 * j + 12], cols, 'gpt2_block_backward')
        x = whole(read_tiles(plpy, GD, xs[j], box), rows, cols, th, tw, 'gpt2_block_backward')
        dy, grads = block_backward(x, dy, w, k, take_acts(GD, xs[j]))
        for i, g in enumerate(grads):
            k = 12 * j + i + 1
            yield from emit_grad(GD, tape, grad_ids[k - 1], g, k, grad_tiles[2 * k - 2], grad_tiles[2 * k - 1])
    for tr, tc, t in cut(dy, th, tw):
        yield 0, tr, tc, t
