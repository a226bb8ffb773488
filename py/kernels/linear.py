"""linear microkernels (the SQL side: py/ops/linear.py): one output panel of act(x @ W + b) [+ r], the product
as matmul's panel kernel computes it, the bias in float32, GELU per output tile, the residual per tile."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.gelu import gelu_tile
from pg_llm.kernels.matmul import operand, read_tiles
from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import block, floats
from pg_llm.kernels.weight_cache import cache_budget


def linear_blocks(x: np.ndarray, w: np.ndarray, i0: int, j0: int, th: int, tn: int, bias_tiles: Sequence[bytes],
                  gelu: bool, pre: bool, res_tiles: Sequence[bytes] = ()) -> Iterator[tuple[int, int, int, bytes]]:
    """Output tiles (k, tr, tc, bytes) of one panel of act(x @ w + b) [+ r], x and w the assembled blocks (x: the
    panel's rows, every column; w: every row, the panel's columns), the panel's first output tile (i0, j0) and
    output tiles (th, tn): k = 0 the output, k = 1 the pre-activation x @ w + b (only when pre). bias_tiles: the
    bias tiles of the panel's columns (empty: no bias); res_tiles: the residual's tiles of the panel in (tr, tc)
    order (empty: none)."""
    if x.shape[1] != w.shape[0]:
        error('pg_llm: linear: x block %s and W block %s' % (x.shape, w.shape))
    y = np.matmul(x, w)
    if bias_tiles:
        b = floats(b''.join(bias_tiles))
        if b.size != y.shape[1]:
            error('pg_llm: linear: %d bias values for %d output columns' % (b.size, y.shape[1]))
        y += b
    if res_tiles and len(res_tiles) != (-(-y.shape[0] // th)) * (-(-y.shape[1] // tn)):
        error('pg_llm: linear: %d residual tiles for a %d x %d panel' % (len(res_tiles), y.shape[0], y.shape[1]))
    res = iter(res_tiles)
    for r in range(0, y.shape[0], th):
        for c in range(0, y.shape[1], tn):
            t = y[r:r + th, c:c + tn].tobytes()
            if pre:
                yield 1, i0 + r // th, j0 + c // tn, t
            if gelu:
                t = gelu_tile(t)
            if res_tiles:
                t = (floats(next(res)) + floats(t)).tobytes()
            yield 0, i0 + r // th, j0 + c // tn, t


def panel_kernel(plpy: Any, GD: dict, x: int, x_geom: Sequence[int], i: int, pi: int, wt_id: int,
                 w_geom: Sequence[int], j: int, pj: int, b: int | None, gelu: bool, pre: bool,
                 res: int | None) -> Iterator[tuple[int, int, int, bytes]]:
    """llm_mk_linear_panel: output panel (i, j), reading panel i of x, panel j of W (a durable W's block from
    the weight cache, under the key llm_matmul's panels use for it), of the bias and of the residual."""
    rows, k, th, tk = x_geom
    n, tn = w_geom[1], w_geom[3]
    xb = [i * pi, min((i + 1) * pi, -(-rows // th)), 0, -(-k // tk)]
    wb = [0, -(-k // w_geom[2]), j * pj, min((j + 1) * pj, -(-n // tn))]
    xm = block(read_tiles(plpy, GD, x, xb), list(x_geom) + xb)
    wm = operand(plpy, GD, wt_id, w_geom, wb, cache_budget(plpy, GD) if wt_id > 0 else 0)
    bt = read_tiles(plpy, GD, b, [0, 1, wb[2], wb[3]]) if b is not None else []
    rt = read_tiles(plpy, GD, res, [xb[0], xb[1], wb[2], wb[3]]) if res is not None else []
    return linear_blocks(xm, wm, xb[0], wb[2], th, tn, bt, gelu, pre, rt)
