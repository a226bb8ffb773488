"""Gradients held in the backend's memory for the length of a training step (the SQL side: py/ops/held.py).

Why: a training step's parameter gradients are as large as the model (497 MB at GPT-2 small); stored as scratch
tiles they were written by the backward, read back by the gradient norm and again by AdamW, rewritten by every
accumulated micro-batch, and were most of the step's peak scratch. A tape that holds its gradients (llm_train_step
asks for it: llm_gpt2_loss_backward's p_hold) keeps each parameter gradient the fused backward kernels make as a
numpy array here, under its tensor's id: the tensor row exists (shape, tiling, llm_tape_grad as ever), its tiles
do not. llm_grad_acc adds held gradients in memory, llm_global_grad_norm and llm_adamw_step read them from here,
and anything else first writes them out (held_write). The step drops them at its end; a failed step's are dropped
when the next one starts (one tape holds at a time per backend).

Also the LM head's pending gradient (not a tensor yet): the tied wte's embedding backward adds its part to it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.tiles import cut

CHUNK = 1 << 20  # floats per float64 chunk of a sum of squares
HOLD = 'llm_held_grads'  # GD: {'tape': id, 'hold': bool, 'grads': {tensor id: array}, 'pending': {id: array}}


def start(GD: dict, tape: int, hold: bool = True) -> dict:
    """tape's state (a previous tape's held gradients dropped); hold: it keeps its parameter gradients."""
    h = GD.get(HOLD)
    if h is None or h['tape'] != tape:
        h = GD[HOLD] = {'tape': tape, 'hold': hold, 'grads': {}, 'pending': {}}
    h['hold'] = h['hold'] or hold
    return h


def stop(GD: dict, tape: int) -> int:
    """Drop tape's held and pending gradients; returns how many gradients were held."""
    h = GD.get(HOLD)
    if h is None or h['tape'] != tape:
        return 0
    del GD[HOLD]
    return len(h['grads'])


def holds_grads(GD: dict, tape: int | None) -> bool:
    """Whether tape keeps its parameter gradients in memory."""
    h = GD.get(HOLD)
    return tape is not None and h is not None and h['tape'] == tape and h['hold']


def held(GD: dict, tid: int) -> np.ndarray | None:
    h = GD.get(HOLD)
    return None if h is None else h['grads'].get(tid)


def keep_pending(GD: dict, tape: int, tensor: int, grad: np.ndarray) -> None:
    """Keep grad as tape's pending gradient of tensor (the head's, before any tensor exists for it)."""
    start(GD, tape, hold=False)['pending'][tensor] = grad


def take_pending(GD: dict, tape: int, tensor: int) -> np.ndarray | None:
    """tape's pending gradient of tensor, removed from memory (None: there is none)."""
    h = GD.get(HOLD)
    return h['pending'].pop(tensor, None) if h is not None and h['tape'] == tape else None


def emit_grad(GD: dict, tape: int | None, tid: int, g: np.ndarray, k: int, th: int,
              tw: int) -> list[tuple[int, int, int, bytes]]:
    """A parameter gradient a backward kernel made: held (no rows) when tape holds its gradients, else its
    (k, tr, tc, data) rows cut in (th, tw) tiles."""
    if holds_grads(GD, tape):
        GD[HOLD]['grads'][tid] = g
        return []
    return [(k, tr, tc, data) for tr, tc, data in cut(g, th, tw)]


# ---- PL/Python entry points (py/ops/held.py) ---------------------------------------------------------------

def hold_kernel(GD: dict, tape: int, on: bool) -> int:
    """llm_mk_hold: start holding tape's gradients (on) or drop them (off: how many were held)."""
    if on:
        start(GD, tape)
        return 0
    return stop(GD, tape)


def add_kernel(GD: dict, dst: int, src: int) -> bool:
    """llm_mk_held_add: dst += src when both are held (src dropped); False (nothing done) otherwise."""
    a, b = held(GD, dst), held(GD, src)
    if a is None or b is None:
        return False
    a += b
    del GD[HOLD]['grads'][src]
    return True


def sq_norm_kernel(GD: dict, tid: int) -> float | None:
    """llm_mk_held_sq_norm: sum of squares of a held gradient, in float64 (None: not held)."""
    a = held(GD, tid)
    if a is None:
        return None
    flat, total = a.ravel(), 0.0
    for i in range(0, flat.size, CHUNK):  # float64 a chunk at a time: no model-sized float64 copy
        d = flat[i:i + CHUNK].astype(np.float64)
        total += float(np.dot(d, d))
    return total


def write_kernel(plpy: Any, GD: dict, tid: int, tile: Sequence[int]) -> int:
    """llm_mk_held_write: write a held gradient's tiles (tiling `tile`) and stop holding it; tiles written."""
    a = held(GD, tid)
    if a is None:
        return 0
    plan = GD.get('llm_held_write_plan')
    if plan is None:
        plan = GD['llm_held_write_plan'] = plpy.prepare(
            "INSERT INTO llm_tile (tensor_id, tr, tc, data) VALUES ($1, $2, $3, $4)", ['bigint', 'int', 'int', 'bytea'])
    n = 0
    for tr, tc, data in cut(a.reshape(-1, a.shape[-1]), tile[0], tile[1]):
        n += plpy.execute(plan, [tid, tr, tc, data]).nrows()
    del GD[HOLD]['grads'][tid]
    return n
