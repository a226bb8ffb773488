"""embedding microkernel: the scatter-add of dy rows into one weight-gradient tile. The SQL side (the forward
gather with substr/string_agg, grouping dy rows by weight tile) is py/ops/embedding.py."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats


def embedding_scatter_tile(segs: bytes, local_rows: Sequence[int], rows: int, cols: int) -> bytes:
    """A (rows x cols) weight-gradient tile: zeros, plus row k of segs (len(local_rows) x cols, float32) added
    into row local_rows[k] (repeated rows accumulate), summed in float64."""
    out = np.zeros((rows, cols), dtype=np.float64)
    if local_rows:
        d = floats(segs)
        if d.size != len(local_rows) * cols:
            error('pg_llm: embedding_backward: got %d floats of dy for %d rows of %d columns'
                  ' (missing dy tiles?)' % (d.size, len(local_rows), cols))
        np.add.at(out, np.asarray(local_rows, dtype=np.int64), d.reshape(-1, cols))
    return out.astype('<f4').tobytes()
