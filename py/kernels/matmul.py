"""matmul microkernels (the SQL side, panel geometry and tiling: py/ops/matmul.py): one numpy matmul per output
panel over assembled blocks of op(A) and op(B); a durable operand's block comes from the weight cache."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.tiles import block, floats
from pg_llm.kernels.weight_cache import cache_budget, cached_block

Tile = tuple[int, int, bytes]


def matmul_tile(a_tiles: Sequence[bytes], b_tiles: Sequence[bytes], m: int, n: int, ta: bool, tb: bool) -> bytes:
    """One output tile (m x n) of op(A) @ op(B) from A's and B's tiles ordered along K."""
    if ta:
        a = np.vstack([floats(t).reshape(-1, m) for t in a_tiles]).T
    else:
        a = np.hstack([floats(t).reshape(m, -1) for t in a_tiles])
    if tb:
        b = np.hstack([floats(t).reshape(n, -1) for t in b_tiles]).T
    else:
        b = np.vstack([floats(t).reshape(-1, n) for t in b_tiles])
    return np.matmul(a, b, dtype=np.float32).tobytes()


def matmul_blocks(a: np.ndarray, a_geom: Sequence[int], ta: bool, b: np.ndarray, b_geom: Sequence[int],
                  tb: bool) -> Iterator[Tile]:
    """Output tiles (tr, tc, bytes) of op(a) @ op(b) for one panel, a and b the assembled blocks of geometry
    a_geom and b_geom (see tiles.block)."""
    y = np.matmul(a.T if ta else a, b.T if tb else b)
    tm, i0 = (a_geom[3], a_geom[6]) if ta else (a_geom[2], a_geom[4])
    tn, j0 = (b_geom[2], b_geom[4]) if tb else (b_geom[3], b_geom[6])
    for r in range(0, y.shape[0], tm):
        for c in range(0, y.shape[1], tn):
            yield i0 + r // tm, j0 + c // tn, y[r:r + tm, c:c + tn].tobytes()


def matmul_panel(a_tiles: Sequence[bytes], a_geom: Sequence[int], ta: bool, b_tiles: Sequence[bytes],
                 b_geom: Sequence[int], tb: bool) -> Iterator[Tile]:
    """Output tiles (tr, tc, bytes) of op(A) @ op(B) for one panel. geom = [rows, cols, tile_rows, tile_cols,
    r0, r1, c0, c1]: the stored tensor and the block of tiles [r0, r1) x [c0, c1) given in (tr, tc) order."""
    return matmul_blocks(block(a_tiles, a_geom), a_geom, ta, block(b_tiles, b_geom), b_geom, tb)


def panel_box(geom: Sequence[int], along_cols: bool, p: int, size: int) -> list[int]:
    """Tile box [r0, r1, c0, c1] of panel p (size tiles along stored columns when along_cols, else rows) of a
    tensor of geometry [rows, cols, tile_rows, tile_cols]."""
    rows, cols, th, tw = geom
    nr, nc = -(-rows // th), -(-cols // tw)
    return [0, nr, p * size, min((p + 1) * size, nc)] if along_cols else [p * size, min((p + 1) * size, nr), 0, nc]


def read_tiles(plpy: Any, GD: dict, tensor_id: int, box: Sequence[int]) -> list[bytes]:
    """Payloads of the tiles box = [r0, r1, c0, c1] (half-open) of a tensor in (tr, tc) order (one cached plan)."""
    plan = GD.get('llm_panel_plan')
    if plan is None:
        plan = GD['llm_panel_plan'] = plpy.prepare(
            'SELECT data FROM llm_tile WHERE tensor_id = $1 AND tr >= $2 AND tr < $3 AND tc >= $4 AND tc < $5 '
            'ORDER BY tr, tc', ['bigint', 'int', 'int', 'int', 'int'])
    return [r['data'] for r in plpy.execute(plan, [tensor_id] + list(box))]


def operand(plpy: Any, GD: dict, tensor_id: int, geom: Sequence[int], box: Sequence[int],
            budget: int) -> np.ndarray:
    """The assembled block box of a tensor: from the weight cache when it is durable (id > 0) and budget > 0
    bytes (keyed by the stored geometry and the box, so matmul and linear share an entry), else from llm_tile."""
    g = list(geom) + list(box)
    if tensor_id > 0 and budget:
        return cached_block(plpy, GD, tensor_id, geom, box, lambda tiles: block(tiles, g), budget)
    return block(read_tiles(plpy, GD, tensor_id, box), g)


def panel_kernel(plpy: Any, GD: dict, a: int, a_geom: Sequence[int], ta: bool, i: int, pi: int, b: int,
                 b_geom: Sequence[int], tb: bool, j: int, pj: int) -> Iterator[Tile]:
    """llm_mk_matmul_panel: output panel (i, j) of op(A) @ op(B), reading panel i (pi tiles along m) of a and
    panel j (pj tiles along n) of b itself (a durable operand's block from the weight cache)."""
    budget = cache_budget(plpy, GD) if a > 0 or b > 0 else 0
    a_box, b_box = panel_box(a_geom, ta, i, pi), panel_box(b_geom, not tb, j, pj)
    return matmul_blocks(operand(plpy, GD, a, a_geom, a_box, budget), list(a_geom) + a_box, ta,
                         operand(plpy, GD, b, b_geom, b_box, budget), list(b_geom) + b_box, tb)
