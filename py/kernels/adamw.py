"""adamw microkernels: one AdamW step on one tile (param, grad, m, v -> new param, m, v), in float32 and in
place like torch.optim.AdamW, and the kernel that steps a range of tile rows of a tensor, reading the four
tiles and writing the three new ones itself. The SQL side (checks, chunks, optimizer state, zero utilities) is
py/ops/adamw.py (sql/kernels/adamw.sql)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats, payload


def adamw_tile(p: bytes, g: bytes, m: bytes, v: bytes, h: Sequence[float]) -> list[bytes]:
    """New (param, m, v) payloads of one tile. h = [lr, beta1, beta2, eps, weight_decay, grad_scale, step]."""
    lr, b1, b2, eps, wd, scale, t = h
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t  # Python floats: beta^t underflows quietly to 0 at late steps
    x = floats(p).copy()
    n = x.size
    if not (len(g) == len(m) == len(v) == 4 * n):
        error('pg_llm: adamw: param, grad, m and v tiles of %d, %d, %d and %d floats (tile shapes differ)'
              % (n, len(g) // 4, len(m) // 4, len(v) // 4))
    c = np.float32  # float32 arithmetic, in place, as torch's: 2.7x faster than float64 per tile
    grad = floats(g) * c(scale)
    m32 = floats(m) * c(b1)
    m32 += c(1.0 - b1) * grad
    grad *= grad
    v32 = floats(v) * c(b2)
    v32 += c(1.0 - b2) * grad
    x *= c(1.0 - lr * wd)
    step = np.sqrt(v32)
    step *= c(1.0 / bc2 ** 0.5)
    step += c(eps)
    np.divide(m32, step, out=step)
    step *= c(lr / bc1)
    x -= step
    return [payload(x), payload(m32), payload(v32)]


# The four tiles of each (tr, tc) of a range of tile rows, and the UPDATE of one tile (both prepared once).
READ = ("SELECT p.tr, p.tc, p.data AS p, g.data AS g, m.data AS m, v.data AS v FROM llm_tile AS p "
        "JOIN llm_tile AS g ON g.tensor_id = $2 AND g.tr = p.tr AND g.tc = p.tc "
        "JOIN llm_tile AS m ON m.tensor_id = $3 AND m.tr = p.tr AND m.tc = p.tc "
        "JOIN llm_tile AS v ON v.tensor_id = $4 AND v.tr = p.tr AND v.tc = p.tc "
        "WHERE p.tensor_id = $1 AND p.tr >= $5 AND p.tr < $6")
WRITE = "UPDATE llm_tile SET data = $4 WHERE tensor_id = $1 AND tr = $2 AND tc = $3"
FETCH = 16  # tile rows of (p, g, m, v) in memory at a time


def adamw_rows(plpy: Any, GD: dict, ids: Sequence[int], h: Sequence[float], r0: int, r1: int) -> int:
    """llm_mk_adamw_rows: adamw_tile on every tile of tile rows [r0, r1) of param ids[0] (grad, m, v: ids[1:]),
    each new param, m and v tile written by one prepared UPDATE; returns how many tiles it wrote. The cursor
    reads in the snapshot it was opened with, so it never sees the versions this call writes.
    Why not one UPDATE ... FROM (the kernel's rows): its join materialized every new payload first (a
    tuplestore of 3 x 32 MiB a chunk, spilled to temporary files beyond work_mem)."""
    plans = GD.get('llm_adamw_plans')
    if plans is None:
        plans = GD['llm_adamw_plans'] = (plpy.prepare(READ, ['bigint'] * 4 + ['int', 'int']),
                                         plpy.prepare(WRITE, ['bigint', 'int', 'int', 'bytea']))
    read, write = plans
    p, _, m, v = ids
    n = 0
    cur = plpy.cursor(read, list(ids) + [r0, r1])
    while True:
        rows = cur.fetch(FETCH)
        if not rows:
            return n
        for r in rows:
            for tid, data in zip((p, m, v), adamw_tile(r['p'], r['g'], r['m'], r['v'], h), strict=True):
                plpy.execute(write, [tid, r['tr'], r['tc'], data])
            n += 3
