"""matmul: C = op(A) @ op(B), op = identity or transpose.

Forward:  y = x @ W                      (llm_matmul(x, W))
          logits = x @ wte^T             (tied output projection: tb => true)
Backward: dx = dy @ W^T                  (llm_matmul(dy, W, tb => true))
          dW = x^T @ dy                  (llm_matmul(x, dy, ta => true, accumulate => true))

Tiling (panel form): the output is cut into panels of whole tiles; each panel is ONE PL/Python call
(llm_mk_matmul_panel) that reads every tile of op(A)'s block rows and op(B)'s block columns for that panel
(one cached SPI plan, in (tr, tc) order), assembles them, does one numpy matmul over the whole K and returns
the panel's output tiles. A panel holds at most PANEL_FLOATS floats of op(A), of op(B) and of the output
(32 MiB each; the setting pg_llm.matmul_panel_floats overrides it), so GPT-2 small's matmuls are one call
and the tied logits projection (x @ wte^T, 154 MB) a few. Reading the tiles in the kernel instead of passing
array_agg(data) saves the array's copy and zeroing (15-30 % of a call). `make bench` (kernels section)
compares it with one call per output tile, per-(i, k, j) partial products summed by llm_tile_sum, the
array_agg panel and numpy on the whole matrices. K must still be cut the same way in A and B (the panel
kernel itself does not need it).

Weight cache: a durable operand (id > 0: a model's weights) is not re-read per call. Its assembled panel block
is kept in the backend's GD and reused while the fingerprint of its tiles' row versions (tr, tc, tableoid,
relfilenode, ctid, xmin: no detoasting) is unchanged in the caller's snapshot, so an update, a rollback, a
rewrite or another session's commit is always seen (weight_cache.py explains why it is exact). Decoding
reads every weight per token, so this is what makes generation fast. pg_llm.weight_cache_mb bounds it (LRU;
0 disables).
"""
from __future__ import annotations

import inspect
import textwrap

from pg_llm.gen.emit import _BOOT, comment, function, microkernel, plpgsql
from pg_llm.ops import weight_cache
from pg_llm.ops.common import KERNEL_SETTINGS, UPSERT
from pg_llm.ops.weight_cache import cached_block

SQL_FILE = "kernels/matmul.sql"
ORDER = 10
PANEL_FLOATS = 8 * 1024 * 1024  # per operand and output panel (32 MiB of float32)
# PL/pgSQL of llm_matmul and llm_linear: panel geometry from v_m, v_k, v_n and the tiles v_tm, v_tn
PANELS = f"""
        -- panels: v_pi tiles of m by v_pj tiles of n, each operand and output panel <= v_budget floats
        v_budget := coalesce(nullif(current_setting('pg_llm.matmul_panel_floats', TRUE), '')::BIGINT, {PANEL_FLOATS});
        v_pi := greatest(1, least((v_m + v_tm - 1) / v_tm, v_budget / (v_tm::BIGINT * v_k)));
        v_pj := greatest(1, least((v_n + v_tn - 1) / v_tn,
                                  v_budget / (v_tn::BIGINT * greatest(v_k, least(v_m, v_pi * v_tm)))));
        v_ni := ((v_m + v_tm - 1) / v_tm + v_pi - 1) / v_pi;
        v_nj := ((v_n + v_tn - 1) / v_tn + v_pj - 1) / v_pj;
""".strip("\n")


def matmul_tile(np, a_tiles, b_tiles, m, n, ta, tb):
    """One output tile (m x n) of op(A) @ op(B) from A's and B's tiles ordered along K."""
    f = '<f4'
    if ta:
        a = np.vstack([np.frombuffer(t, dtype=f).reshape(-1, m) for t in a_tiles]).T
    else:
        a = np.hstack([np.frombuffer(t, dtype=f).reshape(m, -1) for t in a_tiles])
    if tb:
        b = np.hstack([np.frombuffer(t, dtype=f).reshape(n, -1) for t in b_tiles]).T
    else:
        b = np.vstack([np.frombuffer(t, dtype=f).reshape(-1, n) for t in b_tiles])
    return np.matmul(a, b, dtype=np.float32).tobytes()


def block_matrix(np, tiles, g):
    """The float32 block of tiles [r0, r1) x [c0, c1) of a tensor, geom g = [rows, cols, tile_rows, tile_cols,
    r0, r1, c0, c1], from its payloads in (tr, tc) order (a read-only view of one buffer when one tile wide)."""
    rows, cols, th, tw, r0, r1, c0, c1 = g
    if len(tiles) != (r1 - r0) * (c1 - c0):
        plpy.error('pg_llm: matmul: %d tiles for a block of %d x %d tiles (missing tiles?)'  # noqa: F821
                   % (len(tiles), r1 - r0, c1 - c0))
    h, w = min(r1 * th, rows) - r0 * th, min(c1 * tw, cols) - c0 * tw
    if c1 - c0 == 1:
        return np.frombuffer(b''.join(tiles), dtype='<f4').reshape(h, w)
    out = np.empty((h, w), dtype=np.float32)
    it = iter(tiles)
    for r in range(0, h, th):
        for c in range(0, w, tw):
            dst = out[r:r + th, c:c + tw]
            dst[...] = np.frombuffer(next(it), dtype='<f4').reshape(dst.shape)
    return out


def matmul_blocks(np, a, a_geom, ta, b, b_geom, tb):
    """Output tiles (tr, tc, bytes) of op(a) @ op(b) for one panel, a and b the assembled blocks of geometry
    a_geom and b_geom (see block_matrix)."""
    y = np.matmul(a.T if ta else a, b.T if tb else b)
    tm, i0 = (a_geom[3], a_geom[6]) if ta else (a_geom[2], a_geom[4])
    tn, j0 = (b_geom[2], b_geom[4]) if tb else (b_geom[3], b_geom[6])
    for r in range(0, y.shape[0], tm):
        for c in range(0, y.shape[1], tn):
            yield i0 + r // tm, j0 + c // tn, y[r:r + tm, c:c + tn].tobytes()


def matmul_panel(np, a_tiles, a_geom, ta, b_tiles, b_geom, tb):
    """Output tiles (tr, tc, bytes) of op(A) @ op(B) for one panel. geom = [rows, cols, tile_rows, tile_cols,
    r0, r1, c0, c1]: the stored tensor and the block of tiles [r0, r1) x [c0, c1) given in (tr, tc) order."""
    return matmul_blocks(np, block_matrix(np, a_tiles, a_geom), a_geom, ta, block_matrix(np, b_tiles, b_geom),
                         b_geom, tb)


def panel_box(geom, along_cols, p, size):
    """Tile box [r0, r1, c0, c1] of panel p (size tiles along stored columns when along_cols, else rows) of a
    tensor of geometry [rows, cols, tile_rows, tile_cols]."""
    rows, cols, th, tw = geom
    nr, nc = -(-rows // th), -(-cols // tw)
    return [0, nr, p * size, min((p + 1) * size, nc)] if along_cols else [p * size, min((p + 1) * size, nr), 0, nc]


def panel_block(plpy, GD, tensor_id, geom, along_cols, p, size):
    """Tiles of panel p of a tensor (see panel_box) in (tr, tc) order, and the geometry extended with the box."""
    box = panel_box(geom, along_cols, p, size)
    plan = GD.get('llm_panel_plan')
    if plan is None:
        plan = GD['llm_panel_plan'] = plpy.prepare(
            'SELECT data FROM llm_tile WHERE tensor_id = $1 AND tr >= $2 AND tr < $3 AND tc >= $4 AND tc < $5 '
            'ORDER BY tr, tc', ['bigint', 'int', 'int', 'int', 'int'])
    return [r['data'] for r in plpy.execute(plan, [tensor_id] + box)], list(geom) + box


def panel_operand(plpy, GD, np, tensor_id, geom, along_cols, p, size, budget):
    """The assembled block of panel p of a tensor and its geometry: from the weight cache (weight_cache.py)
    when the tensor is durable (id > 0) and budget > 0 bytes, else read from llm_tile."""
    if tensor_id > 0 and budget:
        box = panel_box(geom, along_cols, p, size)
        g = list(geom) + box
        return cached_block(plpy, GD, tensor_id, geom, box, lambda tiles: block_matrix(np, tiles, g), budget), g
    tiles, g = panel_block(plpy, GD, tensor_id, geom, along_cols, p, size)
    return block_matrix(np, tiles, g), g


PANEL_CALL = """
budget = cache_budget(plpy, GD) if a > 0 or b > 0 else 0
am, a_box = panel_operand(plpy, GD, np, a, a_geom, ta, i, pi, budget)
bm, b_box = panel_operand(plpy, GD, np, b, b_geom, not tb, j, pj, budget)
return matmul_blocks(np, am, a_box, ta, bm, b_box, tb)"""

FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, o.tr, o.tc, o.data
    FROM generate_series(0, v_ni - 1) AS pa(i)
    CROSS JOIN generate_series(0, v_nj - 1) AS pb(j)
    CROSS JOIN LATERAL llm_mk_matmul_panel(p_a, v_ga, p_ta, pa.i, v_pi, p_b, v_gb, p_tb, pb.j, v_pj) AS o
    WHERE TRUE
    """ + UPSERT  # WHERE TRUE keeps sqlglot from reading ON CONFLICT as a join condition


def forward_function(name: str, insert: str) -> str:
    """llm_matmul's PL/pgSQL (checks, output allocation, panel sizes) around one INSERT statement; the bench
    builds its alternative kernel forms with it. The INSERT sees p_*, v_m/v_k/v_n, the tiles v_tm/v_tk/v_tn,
    v_out, the panel sizes in tiles v_pi/v_pj, the panel counts v_ni/v_nj and v_ga/v_gb = ARRAY[rows, cols,
    tile_rows, tile_cols] of A and B as stored."""
    body = plpgsql("""
        ra llm_tensor; rb llm_tensor;
        v_m INT; v_k INT; v_kb INT; v_n INT; v_tm INT; v_tk INT; v_tkb INT; v_tn INT; v_out BIGINT;
        v_budget BIGINT; v_pi INT; v_pj INT; v_ni INT; v_nj INT; v_ga INT[]; v_gb INT[];
    """, f"""
        ra := llm_input(p_a, 'matmul', 'a');
        rb := llm_input(p_b, 'matmul', 'b');
        -- logical shapes of op(A) = (m, k) and op(B) = (k, n), and how each axis is tiled
        IF p_ta THEN v_m := llm_cols(ra.shape); v_k := llm_rows(ra.shape); v_tm := ra.tile[2]; v_tk := ra.tile[1];
        ELSE v_m := llm_rows(ra.shape); v_k := llm_cols(ra.shape); v_tm := ra.tile[1]; v_tk := ra.tile[2]; END IF;
        IF p_tb THEN v_n := llm_rows(rb.shape); v_kb := llm_cols(rb.shape); v_tn := rb.tile[1]; v_tkb := rb.tile[2];
        ELSE v_n := llm_cols(rb.shape); v_kb := llm_rows(rb.shape); v_tn := rb.tile[2]; v_tkb := rb.tile[1]; END IF;
        IF v_k <> v_kb THEN
          RAISE EXCEPTION 'pg_llm: matmul: inner dimensions differ: "%" % (transposed: %) and "%" % (transposed: %)',
            ra.name, llm_shape_text(ra.shape), p_ta, rb.name, llm_shape_text(rb.shape), p_tb
            USING HINT = 'op(a) must be (m, k) and op(b) (k, n).';
        END IF;
        IF v_tk <> v_tkb THEN
          RAISE EXCEPTION 'pg_llm: matmul: "%" and "%" cut the inner dimension % in tiles of % and %',
            ra.name, rb.name, v_k, v_tk, v_tkb USING HINT = 'Store both with the same tile size along k.';
        END IF;
        v_out := llm_output(p_out, 'matmul', ARRAY[v_m, v_n], ARRAY[v_tm, v_tn], p_accumulate);
{PANELS}
        v_ga := ARRAY[llm_rows(ra.shape), llm_cols(ra.shape), ra.tile[1], ra.tile[2]];
        v_gb := ARRAY[llm_rows(rb.shape), llm_cols(rb.shape), rb.tile[1], rb.tile[2]];
        @forward;
        RETURN v_out;
    """, forward=insert)
    return function(
        name,
        "p_a BIGINT, p_b BIGINT, p_out BIGINT DEFAULT NULL, p_ta BOOLEAN DEFAULT FALSE, "
        "p_tb BOOLEAN DEFAULT FALSE, p_accumulate BOOLEAN DEFAULT FALSE",
        "BIGINT", body, settings=KERNEL_SETTINGS,
        note="""op: matmul forward. op(A) (m, k) @ op(B) (k, n) -> out (m, n), op = transpose when p_ta/p_tb.
        tiling: out tile is (A's m-tile, B's n-tile); one llm_mk_matmul_panel call per output panel (<= 32 MiB
        of op(A), op(B) and output each). p_out NULL allocates a scratch tensor; p_accumulate adds into p_out.""")


def _backward() -> str:
    body = plpgsql("", """
        PERFORM llm_matmul(p_dy, p_b, p_da, FALSE, TRUE, p_accumulate) WHERE p_da IS NOT NULL;
        PERFORM llm_matmul(p_a, p_dy, p_db, TRUE, FALSE, p_accumulate) WHERE p_db IS NOT NULL;
    """)
    return function(
        "llm_matmul_backward",
        "p_a BIGINT, p_b BIGINT, p_dy BIGINT, p_da BIGINT, p_db BIGINT, p_accumulate BOOLEAN DEFAULT TRUE",
        "VOID", body, settings=KERNEL_SETTINGS,
        note="""op: matmul backward for y = a @ b. da = dy @ b^T (m, k), db = a^T @ dy (k, n), each written
        (or accumulated) into an existing tensor; pass NULL to skip one.""")


def _panel_kernel() -> str:
    fns = (block_matrix, matmul_blocks, panel_box, panel_block, panel_operand)
    src = "\n".join([weight_cache.source()] + [textwrap.dedent(inspect.getsource(f)).strip() for f in fns])
    return function(
        "llm_mk_matmul_panel", "a BIGINT, a_geom INT[], ta BOOLEAN, i INT, pi INT, "
        "b BIGINT, b_geom INT[], tb BOOLEAN, j INT, pj INT", "TABLE(tr INT, tc INT, data BYTEA)",
        f"{_BOOT}\n{src}{PANEL_CALL}", language="plpython3u", volatility="STABLE", strict=True,
        note="""matmul panel kernel: output panel (i, j) of op(A) @ op(B) as (tr, tc, data) rows. It reads
        panel i (pi tiles along m) of tensor a and panel j (pj tiles along n) of tensor b itself (a durable
        operand's block from the backend's weight cache when its row versions are unchanged); geom =
        [rows, cols, tile_rows, tile_cols] as stored. The numpy part is matmul_panel (unit-tested alone).""")


def panel_tiles_kernel(name: str, note: str) -> str:
    """A PL/Python function (a_tiles BYTEA[], a_geom INT[], ta, b_tiles BYTEA[], b_geom INT[], tb) -> output tiles:
    matmul_panel with its helpers, on tiles passed in (the bench's array_agg panel form)."""
    src = "\n".join(textwrap.dedent(inspect.getsource(f)).strip() for f in (block_matrix, matmul_blocks, matmul_panel))
    return function(name, "a_tiles BYTEA[], a_geom INT[], ta BOOLEAN, b_tiles BYTEA[], b_geom INT[], tb BOOLEAN",
                    "TABLE(tr INT, tc INT, data BYTEA)",
                    f"{_BOOT}\n{src}\nreturn matmul_panel(np, a_tiles, a_geom, ta, b_tiles, b_geom, tb)",
                    language="plpython3u", volatility="IMMUTABLE", strict=True, parallel="SAFE", note=note)


def emit() -> str:
    panel = _panel_kernel()
    mk = microkernel("llm_mk_matmul", "a_tiles BYTEA[], b_tiles BYTEA[], m INT, n INT, ta BOOLEAN, tb BOOLEAN",
                     "BYTEA", matmul_tile, "matmul_tile(np, a_tiles, b_tiles, m, n, ta, tb)",
                     note="matmul microkernel: one (m, n) output tile from op(A)'s block row and op(B)'s block column "
                     "(not used by llm_matmul since the panel form; kept for other ops and the bench).")
    return "\n".join([comment(__doc__ or ""), panel, mk, forward_function("llm_matmul", FORWARD), _backward()])
