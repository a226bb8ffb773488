"""llm_doctor() and the bench's BLAS probe: what numpy and BLAS the server's Python runs on, and how fast."""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import time
from typing import Any

import numpy as np


def blas_name() -> str:
    """numpy's BLAS as its build config names it (e.g. 'scipy-openblas 0.3.27')."""
    try:
        b = np.show_config(mode='dicts').get('Build Dependencies', {}).get('blas', {})
        return ('%s %s' % (b.get('name', '?'), b.get('version', ''))).strip()
    except Exception as e:  # older numpy: no mode='dicts'
        return 'unknown (%s)' % e


def sgemm_gflops(n: int = 512, seconds: float = 0.05) -> float:
    """float32 matmul speed of n x n matrices over about `seconds` (after one warm-up product)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        a @ a
        k += 1
    return k * 2 * n ** 3 / (time.perf_counter() - t) / 1e9


def doctor(plpy: Any) -> list[tuple[str, str, str]]:
    """(check, value, status) rows: server, plpython3u, numpy, BLAS, cores, sgemm speed, jit, shared_buffers, wal."""
    rows: list[tuple[str, str, str]] = []

    def add(check: str, value: object, status: str = 'ok') -> None:
        rows.append((check, str(value), status))
    add('server', plpy.execute('SELECT version() AS v')[0]['v'])
    add('plpython3u', 'installed, Python %s' % sys.version.split()[0])
    add('numpy', '%s from %s' % (np.__version__, os.path.dirname(np.__file__)))
    blas = blas_name()
    add('blas', blas)
    add('cores', os.cpu_count())
    gflops = sgemm_gflops()
    if gflops >= 20:
        add('sgemm', '%.1f GFLOP/s' % gflops)
    elif any(k in blas.lower() for k in ('openblas', 'mkl', 'accelerate', 'blis')):
        add('sgemm', '%.1f GFLOP/s' % gflops, 'warning: slow for %s: the machine looks busy (or BLAS threads spin '
            'against each other: try OPENBLAS_NUM_THREADS=1)' % blas)
    else:
        add('sgemm', '%.1f GFLOP/s' % gflops, 'warning: numpy looks like it runs on the reference BLAS; '
            'install pg_llm numpy (make setup) and put it on the postmaster PYTHONPATH')
    add('jit', plpy.execute("SELECT current_setting('jit') AS v")[0]['v'],
        'ok (pg_llm kernels set jit = off per function)')
    # the settings a training step depends on, against the largest visible model's step (read once for both rows)
    r = plpy.execute(
        "SELECT pg_size_bytes(current_setting('shared_buffers')) / 1048576 AS sb, "
        "pg_size_bytes(current_setting('min_wal_size')) / 1048576 AS lo, "
        "pg_size_bytes(current_setting('max_wal_size')) / 1048576 AS hi, "
        "pg_size_bytes(current_setting('wal_buffers')) / 1048576 AS buf, "
        "(SELECT max(llm_step_durable_bytes(m.name)) FROM llm_model AS m) AS step")[0]
    step = int(r['step'] or 0)
    add('shared_buffers', *buffers_status(int(r['sb']), step))
    add('wal', *wal_status(int(r['lo']), int(r['hi']), int(r['buf']), step))
    return rows


def buffers_status(sb_mb: int, step_bytes: int) -> tuple[str, str]:
    """A training step rewrites every parameter and moment tile (step_bytes, llm_step_durable_bytes); with their
    old versions they must fit in shared_buffers, or the backend writes out evicted dirty pages itself (a GPT-2
    small 1 x 128 step: 9.9-16 s with 512 MB, 5.8-7 s with 4 GB, measured 2026-12-03)."""
    step_mb = -(-step_bytes // 1048576)
    value = '%d MB; the largest model rewrites %d MB of parameter and moment tiles a training step' % (sb_mb, step_mb)
    want = 2 * step_mb + 512
    if sb_mb >= want:
        return value, 'ok'
    return value, ('warning: training will write evicted pages from the backend: set shared_buffers >= %d MB '
                   '(a restart), a quarter of memory at most' % want)


def wal_status(lo_mb: int, hi_mb: int, buf_mb: int, step_bytes: int) -> tuple[str, str]:
    """A step writes about step_bytes of WAL. Segments a checkpoint removes (beyond min_wal_size) are created and
    zero-filled again by the next steps, and small WAL buffers make the stepping backend write the WAL itself
    (GPT-2 small 1 x 128, measured 2026-12-03: a mean 10.3 s a step by default, 7.5 s with min_wal_size =
    max_wal_size, wal_init_zero off, wal_buffers 256 MB and wal_writer_delay 10ms)."""
    value = 'min_wal_size %d MB, max_wal_size %d MB, wal_buffers %d MB' % (lo_mb, hi_mb, buf_mb)
    step_mb = -(-step_bytes // 1048576)
    want = 2 * step_mb  # the WAL of two steps: each step's segments are ones a checkpoint recycled
    if step_mb < 256 or (lo_mb >= want and hi_mb >= want and buf_mb >= 64):
        return value, 'ok'
    return value, ('warning: training steps will recreate WAL segments and write WAL from the backend: set '
                   'min_wal_size and max_wal_size >= %d MB, wal_buffers = 256MB (a restart), wal_writer_delay = '
                   '10ms, wal_init_zero = off' % want)


def blas_probe(threads: int = 0) -> dict:
    """numpy's bundled OpenBLAS through ctypes (client side, and the server's llm_bench.blas): set its thread
    count when threads > 0; return threads, core type, build config and the OPENBLAS_* environment."""
    info: dict[str, Any] = {'numpy': np.__version__, 'env': {
        k: v for k, v in os.environ.items() if k.startswith('OPENBLAS') or k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')}}
    libs = sorted(glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, 'numpy.libs', '*openblas*')))
    if not libs:
        info['error'] = 'no OpenBLAS bundled with numpy at %s' % np.__file__
        return info
    lib = ctypes.CDLL(libs[0])  # already loaded by numpy: the same handle

    def sym(name: str) -> Any:
        for s in ('scipy_openblas_%s64_' % name, 'openblas_%s64_' % name, 'openblas_%s' % name):
            if hasattr(lib, s):
                return getattr(lib, s)
        return None
    if threads > 0 and sym('set_num_threads'):
        sym('set_num_threads')(int(threads))
    for key, fn, res in (('threads', 'get_num_threads', ctypes.c_int), ('core', 'get_corename', ctypes.c_char_p),
                         ('config', 'get_config', ctypes.c_char_p)):
        f = sym(fn)
        if f is not None:
            f.restype = res
            v = f()
            info[key] = v.decode().strip() if isinstance(v, bytes) else v
    return info


def blas_probe_json(threads: int = 0) -> str:
    import json

    return json.dumps(blas_probe(threads))
