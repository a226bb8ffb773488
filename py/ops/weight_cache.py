"""Per-backend weight cache, the SQL side: llm_weight_cache_stats / _clear / _forget. The cache itself (why it
is exact under updates, rollbacks, rewrites and other sessions' commits; its LRU budget pg_llm.weight_cache_mb)
is py/kernels/weight_cache.py, imported by the matmul, linear and block-step kernels.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, kernel_body
from pg_llm.kernels.weight_cache import clear, forget, stats

SQL_FILE = "kernels/weight_cache.sql"
ORDER = 9


def emit() -> str:
    out = [comment(__doc__ or "")]
    out.append(function(
        "llm_weight_cache_stats", "", "TABLE(tensors INT, entries INT, bytes BIGINT, hits BIGINT, misses BIGINT, "
        "evictions BIGINT)", kernel_body(stats, "stats(GD)"), language="plpython3u", settings=("jit = off",),
        note="""This backend's weight cache (see the header): tensors (weights, and KV caches mirrored by the fused
        decoding step) and blocks (entries) held, their bytes, and the hits, misses and evictions since the backend
        started or llm_weight_cache_clear()."""))
    out.append(function(
        "llm_weight_cache_clear", "", "BIGINT", kernel_body(clear, "clear(GD)"), language="plpython3u",
        settings=("jit = off",),
        note="Empty this backend's weight cache and reset its counters; returns the bytes freed."))
    out.append(function(
        "llm_weight_cache_forget", "ids BIGINT[]", "BIGINT", kernel_body(forget, "forget(GD, ids)"),
        language="plpython3u", strict=True,
        settings=("jit = off",), note="Drop what this backend's weight cache holds of these tensors (e.g. the "
        "mirrors of KV caches a generation is done with); returns the bytes freed."))
    return "\n".join(out)

