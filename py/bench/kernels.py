"""Kernels bench: llm_matmul at GPT-2 small shapes against numpy on the whole matrices in the client and
inside the same server (a bench-only PL/Python function on whole-matrix bytea), JIT and BLAS threads, and
tile shapes x kernel forms (one call per output tile, per-pair partial products, panels)."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psycopg

from pg_llm.bench import Context, Stats, Table, Timed
from pg_llm.kernels.doctor import blas_probe
from pg_llm.loader.tensors import default_tile, read_tensor, write_tensor
from pg_llm.ops.matmul import FORWARD, PANEL_FLOATS, forward_function, panel_tiles_kernel


@dataclass(frozen=True)
class Case:
    label: str
    a: tuple[int, int]  # stored shapes
    b: tuple[int, int]
    ta: bool = False
    tb: bool = False

    @property
    def mkn(self) -> tuple[int, int, int]:
        m, k = self.a[::-1] if self.ta else self.a
        n = self.b[0] if self.tb else self.b[1]
        return m, k, n

    @property
    def dims(self) -> str:
        a, b = (("({}x{})^T" if t else "{}x{}").format(*x) for x, t in ((self.a, self.ta), (self.b, self.tb)))
        return f"{a} @ {b}"

    @property
    def gflop(self) -> float:
        return 2 * math.prod(self.mkn) / 1e9


FORWARD_CASES = [
    Case("attn c_attn (T=128)", (128, 768), (768, 2304)),
    Case("mlp c_fc (T=128)", (128, 768), (768, 3072)),
    Case("mlp c_proj (T=128)", (128, 3072), (3072, 768)),
    Case("attn c_proj (T=1024)", (1024, 768), (768, 768)),
]
BACKWARD_CASES = [
    Case("dx = dy @ W^T (c_fc)", (128, 3072), (768, 3072), tb=True),
    Case("dW = x^T @ dy (c_fc)", (128, 768), (128, 3072), ta=True),
]

# Tile schemes: (tile of A, tile of B) as stored; K is cut the same way in both.
TILES: dict[str, Callable[[int, int, int], tuple[tuple[int, int], tuple[int, int]]]] = {
    "64x64": lambda m, k, n: ((64, 64), (64, 64)),
    "128x128": lambda m, k, n: ((128, 128), (128, 128)),
    "256x256": lambda m, k, n: ((256, 256), (256, 256)),
    "512x512": lambda m, k, n: ((512, 512), (512, 512)),
    "whole matrix": lambda m, k, n: ((m, k), (k, n)),
    "rows 128xK, W Kx768": lambda m, k, n: ((128, k), (k, 768)),
}

# The previous llm_matmul: one microkernel call per output tile with op(A)'s block row and op(B)'s block column.
TILE_FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, a.i, b.j,
           llm_internal.llm_mk_matmul(a.tiles, b.tiles, llm_internal.llm_tile_dim(v_m, v_tm, a.i),
                                      llm_internal.llm_tile_dim(v_n, v_tn, b.j), p_ta, p_tb)
    FROM (
      SELECT CASE WHEN p_ta THEN t.tc ELSE t.tr END AS i,
             array_agg(t.data ORDER BY CASE WHEN p_ta THEN t.tr ELSE t.tc END) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_a GROUP BY 1
    ) AS a
    CROSS JOIN (
      SELECT CASE WHEN p_tb THEN t.tr ELSE t.tc END AS j,
             array_agg(t.data ORDER BY CASE WHEN p_tb THEN t.tc ELSE t.tr END) AS tiles
      FROM llm_tile AS t WHERE t.tensor_id = p_b GROUP BY 1
    ) AS b
    WHERE TRUE"""

# One call per (i, k, j) tile pair, partial products summed per output tile by the llm_tile_sum aggregate.
PAIRS_FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, p.i, p.j, llm_tile_sum(p.part)
    FROM (
      SELECT a.i, b.j, llm_internal.llm_mk_matmul(ARRAY[a.data], ARRAY[b.data],
                                                  llm_internal.llm_tile_dim(v_m, v_tm, a.i),
                                                  llm_internal.llm_tile_dim(v_n, v_tn, b.j), p_ta, p_tb) AS part
      FROM (SELECT CASE WHEN p_ta THEN t.tc ELSE t.tr END AS i, CASE WHEN p_ta THEN t.tr ELSE t.tc END AS k, t.data
            FROM llm_tile AS t WHERE t.tensor_id = p_a) AS a
      JOIN (SELECT CASE WHEN p_tb THEN t.tr ELSE t.tc END AS j, CASE WHEN p_tb THEN t.tc ELSE t.tr END AS k, t.data
            FROM llm_tile AS t WHERE t.tensor_id = p_b) AS b ON a.k = b.k
    ) AS p
    GROUP BY p.i, p.j"""

# Panels as in llm_matmul, but the tiles are passed as array_agg(data) instead of being read by the kernel.
PANEL_AGG_FORWARD = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT v_out, o.tr, o.tc, o.data
    FROM (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles,
             ARRAY[min(t.tr), max(t.tr) + 1, min(t.tc), max(t.tc) + 1] AS box
      FROM llm_tile AS t WHERE t.tensor_id = p_a
      GROUP BY (CASE WHEN p_ta THEN t.tc ELSE t.tr END) / v_pi
    ) AS a
    CROSS JOIN (
      SELECT array_agg(t.data ORDER BY t.tr, t.tc) AS tiles,
             ARRAY[min(t.tr), max(t.tr) + 1, min(t.tc), max(t.tc) + 1] AS box
      FROM llm_tile AS t WHERE t.tensor_id = p_b
      GROUP BY (CASE WHEN p_tb THEN t.tr ELSE t.tc END) / v_pj
    ) AS b
    CROSS JOIN LATERAL SCHEMA.mk_panel_agg(a.tiles, v_ga || a.box, p_ta, b.tiles, v_gb || b.box, p_tb) AS o
    WHERE TRUE"""

FORMS = {"tile": "one call per output tile", "pairs": "pairs + llm_tile_sum", "panel_agg": "panel, array_agg",
         "panel": "panel, kernel reads (llm_matmul)"}
SIG = "BIGINT, BIGINT, BIGINT, BOOLEAN, BOOLEAN, BOOLEAN"


def setup_sql(s: str) -> str:
    boot = "np = GD.get('np') or plpy.execute('SELECT llm_internal.llm_py_boot() AS v')[0]['v'] and GD['np']"
    ops = """
x = np.frombuffer(a, dtype='<f4').reshape(ash)
y = np.frombuffer(b, dtype='<f4').reshape(bsh)
x, y = (x.T if ta else x), (y.T if tb else y)"""
    args = "a BYTEA, b BYTEA, ash INT[], bsh INT[], ta BOOLEAN, tb BOOLEAN"
    return f"""
        CREATE TABLE IF NOT EXISTS {s}.mat (name TEXT PRIMARY KEY, data BYTEA NOT NULL);
        ALTER TABLE {s}.mat ALTER COLUMN data SET STORAGE EXTERNAL;
        CREATE UNLOGGED TABLE IF NOT EXISTS {s}.out (data BYTEA);
        ALTER TABLE {s}.out ALTER COLUMN data SET STORAGE EXTERNAL;
        CREATE OR REPLACE FUNCTION {s}.np_matmul({args}) RETURNS BYTEA LANGUAGE plpython3u AS $fn$
{boot}{ops}
return np.matmul(x, y).tobytes()
$fn$;
        CREATE OR REPLACE FUNCTION {s}.np_inner({args}, reps INT) RETURNS FLOAT8 LANGUAGE plpython3u AS $fn$
import time
{boot}{ops}
ts = []
for _ in range(reps):
    t0 = time.perf_counter(); np.matmul(x, y); ts.append(time.perf_counter() - t0)
return sorted(ts)[len(ts) // 2]
$fn$;
        {forward_function(f"{s}.matmul_tile", TILE_FORWARD)}
        {forward_function(f"{s}.matmul_pairs", PAIRS_FORWARD)}
        {panel_tiles_kernel(f"{s}.mk_panel_agg", note="bench: array_agg panel")}
        {forward_function(f"{s}.matmul_panel_agg", PANEL_AGG_FORWARD.replace("SCHEMA.", f"{s}."))}
        {forward_function(f"{s}.matmul_jit", FORWARD)}
        ALTER FUNCTION {s}.matmul_jit({SIG}) RESET jit;"""


def calls(form: str, case: Case, ta_tile: tuple[int, int], tb_tile: tuple[int, int]) -> int:
    """Microkernel calls of one matmul in each form (panel: the same sizing as llm_matmul)."""
    m, k, n = case.mkn
    tm, tk = ta_tile[::-1] if case.ta else ta_tile
    tn = tb_tile[0] if case.tb else tb_tile[1]
    i, kk, j = -(-m // tm), -(-k // tk), -(-n // tn)
    if form == "tile":
        return i * j
    if form == "pairs":
        return i * kk * j
    pi = max(1, min(i, PANEL_FLOATS // (tm * k)))
    pj = max(1, min(j, PANEL_FLOATS // (tn * max(k, min(m, pi * tm)))))
    return -(-i // pi) * -(-j // pj)


class Bench:
    def __init__(self, ctx: Context) -> None:
        self.ctx, self.conn, self.s = ctx, ctx.conn, ctx.schema
        self.conn.execute(setup_sql(self.s))
        self.mat_case: Case | None = None
        self.data: dict[Case, tuple[np.ndarray, np.ndarray]] = {}
        self.mats = f"FROM {self.s}.mat AS a, {self.s}.mat AS b WHERE a.name = 'a' AND b.name = 'b'"

    def arrays(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        if case not in self.data:
            rng = np.random.default_rng(len(self.data))
            self.data[case] = (rng.standard_normal(case.a, dtype=np.float32),
                               rng.standard_normal(case.b, dtype=np.float32))
        return self.data[case]

    def load(self, case: Case) -> None:
        """Whole matrices of the case as two bytea rows of {schema}.mat (for numpy in the server)."""
        if self.mat_case != case:
            a, b = self.arrays(case)
            self.conn.execute(f"DELETE FROM {self.s}.mat")
            self.conn.execute(f"INSERT INTO {self.s}.mat VALUES ('a', %s), ('b', %s)", (a.tobytes(), b.tobytes()))
            self.mat_case = case

    def server_numpy(self, case: Case, write: bool = False) -> Timed:
        self.load(case)
        q = f"SELECT length({self.s}.np_matmul(a.data, b.data, %s, %s, %s, %s)) {self.mats}"
        args = (list(case.a), list(case.b), case.ta, case.tb)
        if write:
            q = f"INSERT INTO {self.s}.out " + q.replace("SELECT length(", "SELECT (")
            return Timed(lambda: self.conn.execute(q, args), after=lambda: self.conn.execute(f"TRUNCATE {self.s}.out"))
        return Timed(lambda: self.conn.execute(q, args).fetchone())

    def server_inner(self, case: Case) -> float:
        self.load(case)
        q = f"SELECT {self.s}.np_inner(a.data, b.data, %s, %s, %s, %s, %s) {self.mats}"
        return self.conn.execute(q, (list(case.a), list(case.b), case.ta, case.tb, self.ctx.runs + 2)).fetchone()[0]

    def client_numpy(self, case: Case) -> Stats:
        a, b = self.arrays(case)
        x, y = (a.T if case.ta else a), (b.T if case.tb else b)
        return self.ctx.measure(lambda: np.matmul(x, y))

    def put(self, case: Case, tiles: tuple[tuple[int, int], tuple[int, int]] | None) -> tuple[int, int]:
        a, b = self.arrays(case)
        ta_tile, tb_tile = tiles or (None, None)
        ia = write_tensor(self.conn, a, "bench_a", model=self.ctx.model, role="activation", tile=ta_tile)
        ib = write_tensor(self.conn, b, "bench_b", model=self.ctx.model, role="param", tile=tb_tile, replace=True)
        return ia, ib

    def drop(self, *ids: int) -> None:
        for i in ids:
            self.conn.execute("SELECT llm_tensor_drop(%s)", (i,))
        try:
            self.conn.execute("VACUUM llm_tile_scratch")
        except Exception as e:  # noqa: BLE001 - not the owner (--dsn): autovacuum will do it
            self.ctx.log(f"VACUUM llm_tile_scratch: {e}")

    def check(self, fn: str, case: Case, ia: int, ib: int) -> None:
        """One untimed run compared with numpy (a bench must not time a wrong kernel)."""
        out = self.conn.execute(f"SELECT {fn}(%s, %s, NULL, %s, %s)", (ia, ib, case.ta, case.tb)).fetchone()[0]
        a, b = self.arrays(case)
        want = (a.T if case.ta else a).astype(np.float64) @ (b.T if case.tb else b).astype(np.float64)
        err = float(np.abs(read_tensor(self.conn, out) - want).max()) / max(1.0, float(np.abs(want).max()))
        self.drop(out)
        if err > 1e-4:
            raise AssertionError(f"{fn} on {case.label}: relative error {err:.3g}")

    def kernel(self, fn: str, case: Case, ia: int, ib: int, before: Callable[[], object] | None = None,
               conn: psycopg.Connection | None = None) -> Timed:
        """A timed llm_matmul-like call (on conn, default the bench's); its output is dropped after each run."""
        c, q, args = conn or self.conn, f"SELECT {fn}(%s, %s, NULL, %s, %s)", (ia, ib, case.ta, case.tb)
        ids: list[int] = []
        return Timed(lambda: ids.append(c.execute(q, args).fetchone()[0]), before=before,
                     after=lambda: c.execute("SELECT llm_tensor_drop(%s)", (ids.pop(),)))


def gfs(case: Case, st: Stats | float) -> float:
    return case.gflop / (st.median if isinstance(st, Stats) else st)


def main_table(b: Bench, cases: list[Case]) -> Table:
    t = Table("matmul: llm_matmul vs numpy (default tile 256x256)",
              ["case", "op(A) @ op(B)", "numpy client ms", "numpy in server ms", "numpy in server + INSERT ms",
               "llm_matmul ms", "GFLOP/s client", "GFLOP/s server numpy", "GFLOP/s llm_matmul",
               "llm_matmul / server numpy", "llm_matmul / (server numpy + INSERT)", "llm_matmul, B cached ms"])
    client = {case: b.client_numpy(case) for case in cases}
    cached = b.ctx.connect()  # the weight cache on (the default): B, a param, is read once
    time.sleep(0.5)  # let the client's OpenBLAS threads stop spinning before timing the server
    for case in cases:
        b.ctx.log(f"matmul {case.label}")
        ia, ib = b.put(case, None)
        b.check("llm_matmul", case, ia, ib)
        r = b.ctx.compare({"np": b.server_numpy(case), "npw": b.server_numpy(case, write=True),
                           "llm": b.kernel("llm_matmul", case, ia, ib),
                           "cached": b.kernel("llm_matmul", case, ia, ib, conn=cached)})
        b.drop(ia, ib)
        inner = b.server_inner(case)
        cl, sv, km = client[case], r["np"], r["llm"]
        t.add(case.label, case.dims, cl.ms, sv.ms, r["npw"].ms, km.ms, gfs(case, cl), gfs(case, sv),
              gfs(case, km), km.median / sv.median, km.median / r["npw"].median, r["cached"].ms)
        t.notes.append(f"{case.label}: numpy.matmul alone inside the server {inner * 1e3:.2f} ms "
                       f"({gfs(case, inner):.0f} GFLOP/s); spread of the llm_matmul runs {km.spread:.0%}")
    cached.close()
    t.notes.append("numpy in server = one PL/Python call on the whole matrices stored as bytea (detoast, "
                   "conversion, matmul, result bytea, not stored); + INSERT also stores the result (UNLOGGED, "
                   "EXTERNAL storage), the floor for any kernel that writes its output.")
    t.notes.append("llm_matmul reads both operands' tiles every call here (pg_llm.weight_cache_mb = 0, as in every "
                   "kernels table); B cached = the default, B (a param) from the backend's weight cache after the "
                   "first call, A (an activation) still read.")
    return t


def jit_count(b: Bench, fn: str, case: Case, ia: int, ib: int, settings: str) -> str:
    """'compiled/total' nested statements of one call in a fresh backend, from auto_explain (needs the right
    to LOAD it; else '-')."""
    msgs: list[str] = []
    with b.ctx.connect() as c:
        try:
            c.execute("LOAD 'auto_explain'")
        except psycopg.Error:
            return "-"
        c.execute(settings + "; SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
                  " SET auto_explain.log_analyze = on; SET client_min_messages = log")
        c.add_notice_handler(lambda d: msgs.append(d.message_primary or ""))
        out = c.execute(f"SELECT {fn}(%s, %s, NULL, %s, %s)", (ia, ib, case.ta, case.tb)).fetchone()[0]
        c.execute("SELECT llm_tensor_drop(%s)", (out,))
    plans = [m for m in msgs if "plan:" in m]
    return f"{sum('JIT:' in m for m in plans)}/{len(plans)}"


def jit_table(b: Bench, cases: list[Case]) -> Table:
    t = Table("matmul: JIT (llm_matmul sets jit = off)",
              ["case", "jit off (shipped) ms", "jit on, default costs ms", "jit on, all costs 0 ms", "forced / off",
               "statements JIT-compiled (default / forced)"])
    force = "SET jit = on; SET jit_above_cost = 0; SET jit_inline_above_cost = 0; SET jit_optimize_above_cost = 0"
    conns = {k: b.ctx.connect() for k in ("off", "on", "forced")}  # one backend each: no shared plan cache
    for c in conns.values():
        c.execute("SET pg_llm.weight_cache_mb = 0")  # read B's tiles every call, as the other tables
    conns["on"].execute("SET jit = on")
    conns["forced"].execute(force)
    try:
        for case in cases:
            b.ctx.log(f"jit {case.label}")
            ia, ib = b.put(case, None)
            b.check(f"{b.s}.matmul_jit", case, ia, ib)
            r = b.ctx.compare({k: b.kernel("llm_matmul" if k == "off" else f"{b.s}.matmul_jit", case, ia, ib,
                                           conn=c) for k, c in conns.items()})
            counts = [jit_count(b, f"{b.s}.matmul_jit", case, ia, ib, x) for x in ("SET jit = on", force)]
            b.drop(ia, ib)
            t.add(case.label, r["off"].ms, r["on"].ms, r["forced"].ms, r["forced"].median / r["off"].median,
                  " / ".join(counts))
    finally:
        for c in conns.values():
            c.close()
    t.notes.append("jit on = a bench copy of llm_matmul without SET jit = off, each variant in its own backend. "
                   "Its statements are estimated far below jit_above_cost (100000), so with default costs nothing "
                   "is compiled; when JIT fires (all costs 0 here; large row estimates in practice) each nested "
                   "statement pays ~1-10 ms of LLVM code generation, every call.")
    return t


def threads_table(b: Bench, cases: list[Case]) -> Table | None:
    client0 = blas_probe().get("threads")
    server0 = int(json.loads(b.conn.execute(f"SELECT {b.s}.blas(0)").fetchone()[0]).get("threads") or 0)
    if not client0 or not server0 or server0 == 1:
        return None
    t = Table("matmul: OpenBLAS threads inside the server", ["case", "threads", "numpy in server ms",
                                                             "llm_matmul ms", "numpy client ms"])
    for case in cases:
        b.ctx.log(f"threads {case.label}")
        ia, ib = b.put(case, None)
        variants = {}
        for n in (1, server0):
            def setn(n: int = n) -> None:
                b.conn.execute(f"SELECT {b.s}.blas(%s)", (n,))
            variants[f"np{n}"] = b.server_numpy(case)
            variants[f"np{n}"].before = setn
            variants[f"llm{n}"] = b.kernel("llm_matmul", case, ia, ib, before=setn)
        r = b.ctx.compare(variants)
        b.conn.execute(f"SELECT {b.s}.blas(%s)", (server0,))
        b.drop(ia, ib)
        for n in (1, server0):
            blas_probe(n)
            cl = b.client_numpy(case)
            t.add(case.label, n, r[f"np{n}"].ms, r[f"llm{n}"].ms, cl.ms)
        blas_probe(client0)
        time.sleep(0.5)
    t.notes.append("threads set through numpy's OpenBLAS (openblas_set_num_threads) in the bench's backend only "
                   "(and in the client for its column); the cluster's environment is unchanged. Idle OpenBLAS "
                   "threads spin for a while after each call, which costs when cores are shared.")
    return t


def forms_table(b: Bench, cases: list[Case]) -> tuple[Table, Table]:
    t = Table(f"matmul: tile shapes x kernel forms (ms, median of {min(b.ctx.runs, 3)})",
              ["case", "tiles", "calls tile/pairs/panel", *(f"{v} ms" for v in FORMS.values()),
               "best / server numpy"])
    ratios: dict[tuple[str, str], list[float]] = {}
    for case in cases:
        m, k, n = case.mkn
        for tname, scheme in TILES.items():
            tiles = scheme(m, k, n)
            b.ctx.log(f"forms {case.label} {tname}")
            ia, ib = b.put(case, tiles)
            fns = {"np": b.server_numpy(case)}
            for form in FORMS:
                fn = "llm_matmul" if form == "panel" else f"{b.s}.matmul_{form}"
                b.check(fn, case, ia, ib)
                fns[form] = b.kernel(fn, case, ia, ib)
            r = b.ctx.compare(fns, runs=min(b.ctx.runs, 3))
            b.drop(ia, ib)
            for form in FORMS:
                ratios.setdefault((tname, form), []).append(r[form].median / r["np"].median)
            stored = [default_tile(s, tl) for s, tl in zip((case.a, case.b), tiles, strict=True)]
            label = tname if tname[0].isdigit() else "%s (A %dx%d, B %dx%d)" % (tname, *stored[0], *stored[1])
            t.add(case.label, label, " / ".join(str(calls(f, case, *tiles)) for f in ("tile", "pairs", "panel")),
                  *(r[f].ms for f in FORMS), min(r[f].median for f in FORMS) / r["np"].median)
    s = Table("matmul: geometric mean over the cases of time / numpy in server", ["tiles", *FORMS.values()])
    for tname in TILES:
        s.add(tname, *(math.exp(sum(map(math.log, ratios[(tname, f)])) / len(ratios[(tname, f)])) for f in FORMS))
    s.notes.append("1.0 = as fast as one numpy call on the whole matrices inside the server (which does not store "
                   f"its result), measured interleaved with each row. panel = the shipped llm_matmul: panels of <= "
                   f"{PANEL_FLOATS * 4 >> 20} MiB per operand: GPT-2 small's matmuls are one call whatever the tile.")
    return t, s


def run(ctx: Context) -> list[Table]:
    b = Bench(ctx)
    fwd = FORWARD_CASES[:2] if ctx.quick else FORWARD_CASES
    # B is a param: without this llm_matmul would take it from the backend's weight cache (ops/weight_cache.py)
    # after the first run, while the tables compare kernels that read their tiles every call.
    ctx.conn.execute("SET pg_llm.weight_cache_mb = 0")
    try:
        out = [main_table(b, fwd + ([] if ctx.quick else BACKWARD_CASES)), jit_table(b, fwd)]
        th = threads_table(b, fwd)
        if th is not None:
            out.append(th)
        out += forms_table(b, fwd)
    finally:
        ctx.conn.execute("RESET pg_llm.weight_cache_mb")
    return out
