"""adamw microkernels: one AdamW step on one tile (param, grad, m, v -> new param, m, v), in float32 and in
place like torch.optim.AdamW, and the kernel that steps a range of tile rows of a tensor, reading the four
tiles and writing the three new ones itself. The SQL side (checks, chunks, optimizer state, zero utilities) is
py/ops/adamw.py (sql/kernels/adamw.sql)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.held import held
from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import F32, block, cut, floats, payload
from pg_llm.kernels.weight_cache import adopt_tensor, cache_budget, cached_tensors, forget


def adamw_arrays(x: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                 h: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New (param, m, v) float32 arrays from param x, grad g, moments m, v of one shape (none modified).
    h = [lr, beta1, beta2, eps, weight_decay, grad_scale, step]."""
    lr, b1, b2, eps, wd, scale, t = h
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t  # Python floats: beta^t underflows quietly to 0 at late steps
    c = np.float32  # float32 arithmetic, in place, as torch's: 2.7x faster than float64 per tile
    grad = g * c(scale)
    m32 = m * c(b1)
    m32 += c(1.0 - b1) * grad
    grad *= grad
    v32 = v * c(b2)
    v32 += c(1.0 - b2) * grad
    x = x * c(1.0 - lr * wd)
    step = np.sqrt(v32)
    step *= c(1.0 / bc2 ** 0.5)
    step += c(eps)
    np.divide(m32, step, out=step)
    step *= c(lr / bc1)
    x -= step
    return x, m32, v32


CHUNK = 1 << 16  # floats a pass of the whole-array step: each array's chunk stays in the CPU cache between passes


def adamw_chunked(x: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, h: Sequence[float],
                  out: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, ...]:
    """adamw_arrays over whole tensors, CHUNK floats at a time (the same values: the step is elementwise): 4-8x
    faster than whole-array passes, which each stream the arrays through memory (wte: 0.14-0.3 s, not 1.1-1.4 s).
    out: the (param, m, v) arrays to write (x, m and v themselves: an in-place step), else new ones."""
    dsts = tuple(np.empty(x.shape, dtype=F32) for _ in range(3)) if out is None else tuple(out)
    flat = [a.reshape(-1) for a in (x, g, m, v)]
    dst = [a.reshape(-1) for a in dsts]
    for i in range(0, flat[0].size, CHUNK):
        for d, r in zip(dst, adamw_arrays(*(a[i:i + CHUNK] for a in flat), h), strict=True):
            d[i:i + CHUNK] = r
    return dsts


def _owned(a: np.ndarray) -> np.ndarray:
    """a, writeable, when it owns its buffer (a cache entry the caller has taken out of the cache), else a copy."""
    if a.base is None and a.flags.c_contiguous:
        a.flags.writeable = True
        return a
    return np.array(a, dtype=F32, order='C')


def adamw_tile(p: bytes, g: bytes, m: bytes, v: bytes, h: Sequence[float]) -> list[bytes]:
    """New (param, m, v) payloads of one tile (adamw_arrays). h = [lr, beta1, beta2, eps, weight_decay,
    grad_scale, step]."""
    n = len(p) // 4
    if not (len(g) == len(m) == len(v) == 4 * n):
        error('pg_llm: adamw: param, grad, m and v tiles of %d, %d, %d and %d floats (tile shapes differ)'
              % (n, len(g) // 4, len(m) // 4, len(v) // 4))
    return [payload(a) for a in adamw_arrays(floats(p), floats(g), floats(m), floats(v), h)]


# The tiles of each (tr, tc) of a range of tile rows (the param's own left out when it comes from the weight
# cache, the grad's when it is held in memory: their $1 / $2 then go unused), and the UPDATE of one tile; prepared
# once per backend.
READ = ("SELECT m.tr, m.tc, {p}{g}m.data AS m, v.data AS v FROM llm_tile AS m "
        "JOIN llm_tile AS v ON v.tensor_id = $4 AND v.tr = m.tr AND v.tc = m.tc {jp}{jg}"
        "WHERE m.tensor_id = $3 AND m.tr >= $5 AND m.tr < $6 ORDER BY m.tr, m.tc")
JOIN_P = "JOIN llm_tile AS p ON p.tensor_id = $1 AND p.tr = m.tr AND p.tc = m.tc "
JOIN_G = "JOIN llm_tile AS g ON g.tensor_id = $2 AND g.tr = m.tr AND g.tc = m.tc "
WRITE = "UPDATE llm_tile SET data = $4 WHERE tensor_id = $1 AND tr = $2 AND tc = $3"
FETCH = 16  # tile rows of (p, g, m, v) in memory at a time


def _plans(plpy: Any, GD: dict) -> dict:
    """{(param read, grad read): cursor plan, 'write': the UPDATE}."""
    plans = GD.get('llm_adamw_plans')
    if plans is None:
        types = ['bigint'] * 4 + ['int', 'int']
        plans = {(rp, rg): plpy.prepare(READ.format(p='p.data AS p, ' if rp else '', g='g.data AS g, ' if rg else '',
                                                    jp=JOIN_P if rp else '', jg=JOIN_G if rg else ''), types)
                 for rp in (True, False) for rg in (True, False)}
        plans['write'] = plpy.prepare(WRITE, ['bigint', 'int', 'int', 'bytea'])
        GD['llm_adamw_plans'] = plans
    return plans


def adamw_rows(plpy: Any, GD: dict, ids: Sequence[int], h: Sequence[float], r0: int, r1: int,
               geom: Sequence[int]) -> int:
    """llm_mk_adamw_rows: adamw_tile on every tile of tile rows [r0, r1) of param ids[0] (grad, m, v: ids[1:];
    geom = [rows, cols, tile rows, tile cols] of all four), each new param, m and v tile written by one prepared
    UPDATE; returns how many tiles it wrote. The cursor reads in the snapshot it was opened with, so it never sees
    the versions this call writes. When the call covers the whole param, the param comes from the weight cache
    (the step's forward left it there) and its new value goes back into it (adopt_tensor), so neither this call
    nor the next step's forward reads the param's tiles. A gradient held in memory (held.py) is read there.
    Why not one UPDATE ... FROM (the kernel's rows): its join materialized every new payload first (a
    tuplestore of 3 x 32 MiB a chunk, spilled to temporary files beyond work_mem)."""
    plans = _plans(plpy, GD)
    rows, cols, th, tw = geom
    budget = cache_budget(plpy, GD)
    p, g, m, v = ids
    whole = r0 == 0 and r1 * th >= rows and budget > 0
    pm = cached_tensors(plpy, GD, [p], block, budget)[0] if whole else None
    gm = held(GD, g)
    if gm is not None and gm.shape != (rows, cols):
        error('pg_llm: adamw: the held gradient %s has shape %s, the param (%d, %d)' % (g, gm.shape, rows, cols))
    if whole and gm is not None:
        return _in_memory(plpy, GD, ids, h, geom, budget, plans['write'], pm, gm)
    new = np.empty((rows, cols), dtype=F32) if whole else None
    n = 0
    cur = plpy.cursor(plans[(not whole, gm is None)], list(ids) + [r0, r1])
    while True:
        batch = cur.fetch(FETCH)
        if not batch:
            break
        for r in batch:
            tile = np.s_[r['tr'] * th:(r['tr'] + 1) * th, r['tc'] * tw:(r['tc'] + 1) * tw]
            pt = pm[tile].tobytes() if whole else r['p']
            out = adamw_tile(pt, r['g'] if gm is None else gm[tile].tobytes(), r['m'], r['v'], h)
            if whole:
                new[tile] = floats(out[0]).reshape(new[tile].shape)
            for tid, data in zip((p, m, v), out, strict=True):
                n += plpy.execute(plans['write'], [tid, r['tr'], r['tc'], data]).nrows()
    if whole and n == 3 * (-(-rows // th)) * (-(-cols // tw)):
        adopt_tensor(plpy, GD, p, new, budget)
    return n


def _in_memory(plpy: Any, GD: dict, ids: Sequence[int], h: Sequence[float], geom: Sequence[int], budget: int,
               write: Any, pm: np.ndarray, gm: np.ndarray) -> int:
    """adamw_rows over a whole param whose grad is held and whose param comes from the weight cache: m and v from
    the weight cache too (read whole on a miss), one array step, each new tile written, and the new param, m and
    v adopted by the cache (the next step reads no tile of any of them)."""
    p, _, m, v = ids
    th, tw = geom[2], geom[3]
    mm, vm = cached_tensors(plpy, GD, [m, v], block, budget)
    # Stepped in place: a step used to allocate 1.5 GB of new arrays at GPT-2 small, and the kernel zeroing their
    # fresh pages cost ~1 s. The entries leave the cache first, so a step that fails halfway leaves none behind.
    forget(GD, [p, m, v])
    out = adamw_chunked(pm, gm, mm, vm, h, out=[_owned(a) for a in (pm, mm, vm)])
    n = 0
    for tid, a in zip((p, m, v), out, strict=True):
        for tr, tc, data in cut(a, th, tw):
            n += plpy.execute(write, [tid, tr, tc, data]).nrows()
    if n == 3 * (-(-geom[0] // th)) * (-(-geom[1] // tw)):
        for tid, a in zip((p, m, v), out, strict=True):
            adopt_tensor(plpy, GD, tid, a, budget)
    return n
