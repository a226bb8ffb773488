"""common microkernel: the tile sum behind accumulation (UPSERT) and the llm_tile_sum aggregate. The SQL side
(llm_input, llm_output, the aggregate) is py/ops/common.py."""
from __future__ import annotations

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats


def add_tiles(a: bytes, b: bytes) -> bytes:
    """Elementwise float32 sum of two tiles of the same shape."""
    x = floats(a)
    y = floats(b)
    if x.size != y.size:
        error('pg_llm: cannot add tiles of %d and %d floats (tile shapes differ)' % (x.size, y.size))
    return (x + y).tobytes()
