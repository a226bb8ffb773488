"""COPY bench: 124M floats (GPT-2 small's parameter count) through pg_llm.loader.tensors write_tensor /
read_tensor (binary COPY of tiles), into the UNLOGGED scratch partition and the logged durable one, and by
tile shape."""
from __future__ import annotations

import time

import numpy as np

from pg_llm.bench import Context, Stats, Table
from pg_llm.loader.tensors import iter_tiles, read_tensor, write_tensor

N_PARAMS = 124_439_808  # GPT-2 small = 162031 rows of 768
COLS = 768
SWEEP = [(64, 64), (128, 128), (512, 512), (256, 768)]


def _gbs(nbytes: int, st: Stats) -> float:
    return nbytes / st.median / 1e9


class CopyBench:
    def __init__(self, ctx: Context, rows: int) -> None:
        self.ctx, self.conn = ctx, ctx.conn
        ctx.log(f"generating {rows * COLS / 1e6:.0f}M floats")
        self.arr = np.random.default_rng(0).standard_normal((rows, COLS), dtype=np.float32)
        self.nbytes = self.arr.nbytes
        self.ids: list[int] = []

    def vacuum(self, role: str) -> None:
        part = "llm_tile_scratch" if role in ("activation", "cache") else "llm_tile_durable"
        try:
            self.conn.execute(f"VACUUM {part}")
        except Exception as e:  # noqa: BLE001 - not the owner (--dsn): autovacuum will do it
            self.ctx.log(f"VACUUM {part}: {e}")

    def drop(self, role: str) -> None:
        while self.ids:
            self.conn.execute("SELECT llm_tensor_drop(%s)", (self.ids.pop(),))
        self.vacuum(role)

    def write(self, role: str, tile: tuple[int, int] | None) -> int:
        tid = write_tensor(self.conn, self.arr, "bench_copy", model=self.ctx.model, role=role, tile=tile,
                           replace=True)
        self.ids.append(tid)
        return tid

    def run(self, role: str, tile: tuple[int, int] | None, runs: int) -> tuple[Stats, Stats, int]:
        """write_tensor then read_tensor timings (the writes are dropped, untimed, after each run)."""
        w = self.ctx.measure(lambda: self.write(role, tile), runs=runs, warmup=0, after=lambda: self.drop(role))
        tid = self.write(role, tile)
        tiles = self.conn.execute("SELECT count(*) FROM llm_tile WHERE tensor_id = %s", (tid,)).fetchone()[0]
        got: list[np.ndarray] = []
        r = self.ctx.measure(lambda: got.append(read_tensor(self.conn, tid)), runs=runs, warmup=0,
                             after=got.clear)
        if not np.array_equal(read_tensor(self.conn, tid), self.arr):
            raise AssertionError(f"read_tensor returned different values ({role}, tile {tile})")
        self.drop(role)
        return w, r, tiles


def run(ctx: Context) -> list[Table]:
    rows = N_PARAMS // COLS // (8 if ctx.quick else 1)
    b = CopyBench(ctx, rows)
    runs = min(ctx.runs, 3)
    gb = b.nbytes / 1e9
    t = Table(f"COPY: {rows * COLS / 1e6:.1f}M floats ({gb:.2f} GB) through write_tensor / read_tensor",
              ["direction", "partition", "tile", "tiles", "seconds", "GB/s"])
    t0 = time.perf_counter()
    n = sum(len(d) for _, _, d in iter_tiles(b.arr, (256, 256)))
    dt = time.perf_counter() - t0
    t.add("client only: iter_tiles to bytes", "-", "256x256", -(-rows // 256) * 3, dt, n / dt / 1e9)
    for role, part in (("activation", "scratch (UNLOGGED)"), ("param", "durable (logged)")):
        ctx.log(f"copy {role} default tile")
        w, r, tiles = b.run(role, None, runs)
        t.add("write_tensor (COPY FROM)", part, "default 256x256", tiles, w.median, _gbs(b.nbytes, w))
        t.add("read_tensor (COPY TO)", part, "default 256x256", tiles, r.median, _gbs(b.nbytes, r))
    s = Table("COPY by tile shape (scratch partition)", ["tile", "tiles", "write s", "write GB/s", "read s",
                                                           "read GB/s"])
    for tile in SWEEP:
        ctx.log(f"copy tile {tile}")
        w, r, tiles = b.run("activation", tile, 1)
        s.add(f"{tile[0]}x{tile[1]}", tiles, w.median, _gbs(b.nbytes, w), r.median, _gbs(b.nbytes, r))
    t.notes.append(f"median of {runs} runs; write includes the NaN check and cutting tiles in the client; "
                   "read includes reassembling the array. Tiles are TOASTed out of line (EXTERNAL, ~2 KB chunks).")
    s.notes.append("one run each (noisier than the table above, which has the default tile).")
    return [t, s]
