"""What kernel modules share inside the server: PL/Python's plpy, and errors in pg_llm's form. Offline tests
bind a fake plpy (tests/helpers.FakePlpy)."""
from __future__ import annotations

from typing import Any

try:
    import plpy  # inside PostgreSQL: PL/Python's module
except ImportError:  # offline
    plpy: Any = None


def bind(module: Any) -> None:
    """Use `module` as plpy (tests)."""
    global plpy
    plpy = module


def error(msg: str, hint: str | None = None) -> None:
    """Raise a pg_llm error (message 'pg_llm: ...', optional HINT) through plpy."""
    if hint is None:
        plpy.error(msg)
    plpy.error(msg, hint=hint)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEPT = 'llm_malloc_kept'  # GD: whether this backend keeps its freed memory (keep_freed_memory)


def keep_freed_memory(GD: dict) -> bool:
    """Make this backend's C library keep the memory numpy frees for the next allocation instead of returning it to
    the kernel (glibc: no mmap'd chunks, no trimming of the heap's top); once per backend, True when in effect.

    Why: a training step allocates and frees gigabytes of arrays. By default each array over 32 MB is mmap'd and
    unmapped when freed, so every step faulted its memory in afresh, page by zeroed page, and on a VM that hands
    freed memory back to its host that is slow: GPT-2 small at 2 x 1024 tokens took 38-50 s a step, 28-30 s with
    freed memory kept (2026-12-03). The cost: the backend holds on to its largest step's memory until it exits."""
    if KEPT not in GD:
        GD[KEPT] = _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return GD[KEPT]


def _mallopt(*settings: tuple[int, int]) -> bool:
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt tuning): keep the library's policy
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(k, v) == 1 for k, v in settings)
