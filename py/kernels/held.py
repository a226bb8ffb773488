"""Gradients held in the backend's memory for the length of a training step (the SQL side: py/ops/held.py).

Why: a training step's parameter gradients are as large as the model (497 MB at GPT-2 small); stored as scratch
tiles they were written by the backward, read back by the gradient norm and again by AdamW, rewritten by every
accumulated micro-batch, and were most of the step's peak scratch. A tape that holds its gradients (llm_train_step
asks for it: llm_gpt2_loss_backward's p_hold) keeps each parameter gradient the fused backward kernels make as a
numpy array here, under its tensor's id: the tensor row exists (shape, tiling, llm_tape_grad as ever), its tiles
do not. llm_grad_acc adds held gradients in memory, llm_global_grad_norm and llm_adamw_step read them from here,
and anything else first writes them out (held_write). The step drops them at its end; a failed step's are dropped
when the next one starts (one tape holds at a time per backend).

Also the LM head's pending gradient (not a tensor yet): the tied wte's embedding backward adds its part to it; and
while a tape holds its gradients, the fused blocks' forward intermediates, up to pg_llm.train_keep_mb, so that
their backward does not recompute them (each block's input stays a scratch tensor either way).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.runtime import keep_freed_memory
from pg_llm.kernels.tiles import cut

CHUNK = 1 << 20  # floats per float64 chunk of a sum of squares
KEEP_MB = 2048  # a training step's kept block intermediates (pg_llm.train_keep_mb)
HOLD = 'llm_held_grads'  # GD: {'tape': id, 'hold': bool, 'grads': {tensor id: array}, 'pending': {id: array}}


def start(GD: dict, tape: int, hold: bool = True) -> dict:
    """tape's state (a previous tape's held gradients dropped); hold: it keeps its parameter gradients."""
    h = GD.get(HOLD)
    if h is None or h['tape'] != tape:
        h = GD[HOLD] = {'tape': tape, 'hold': hold, 'grads': {}, 'pending': {}, 'acts': {}, 'acts_bytes': 0}
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


def keep_acts(plpy: Any, GD: dict, x: int, saved: dict) -> bool:
    """Keep a fused block's forward intermediates (saved) under its input tensor x for its backward, while a tape
    holds its gradients and they fit pg_llm.train_keep_mb (default KEEP_MB) with those kept already."""
    h = GD.get(HOLD)
    if h is None or not h['hold']:
        return False
    size = sum(a.nbytes for a in saved.values())
    if h['acts_bytes'] + size > keep_budget(plpy, GD):
        return False
    h['acts'][x] = saved
    h['acts_bytes'] += size
    return True


def take_acts(GD: dict, x: int) -> dict | None:
    """The intermediates kept for the block whose input is tensor x (removed), or None: recompute them."""
    h = GD.get(HOLD)
    saved = None if h is None else h['acts'].pop(x, None)
    if saved is not None:
        h['acts_bytes'] -= sum(a.nbytes for a in saved.values())
    return saved


def keep_budget(plpy: Any, GD: dict) -> int:
    """pg_llm.train_keep_mb in bytes (default KEEP_MB; 0: every block's backward recomputes its forward)."""
    plan = GD.get('llm_keep_budget_plan')
    if plan is None:
        plan = GD['llm_keep_budget_plan'] = plpy.prepare("SELECT current_setting('pg_llm.train_keep_mb', TRUE) AS v")
    v = plpy.execute(plan)[0]['v']
    try:
        mb = KEEP_MB if v is None or v.strip() == '' else float(v)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < float('inf'):
        plpy.error('pg_llm: pg_llm.train_keep_mb must be a number of megabytes >= 0, got %r' % v,
                   hint='0 recomputes every block in the backward; the default is %d.' % KEEP_MB)
    return int(mb * 1048576)


def holds_any(GD: dict) -> bool:
    """Whether a tape of this backend holds its gradients now (a training step's forward is running)."""
    h = GD.get(HOLD)
    return h is not None and h['hold']


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
    """llm_mk_hold: start holding tape's gradients (on) or drop them (off: how many were held). A backend that
    trains keeps the memory it frees (runtime.keep_freed_memory)."""
    if on:
        keep_freed_memory(GD)
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
