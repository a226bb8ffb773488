"""Data-parallel training, the rank side of the gradient exchange (the SQL side: py/api/cluster_train_rank.py).

Phase 1 of a cluster step committed every rank's share of the gradients, as tiles, into llm_internal.llm_dp_grad
(its loss scaled by rows_r / B, so the sum over ranks is the single-node gradient). Phase 2 runs this on every
rank: it reads the contribution of rank 0, 1, ... n-1 in that order (its own from the table, the others' through
the dblink connections its caller opened to them) and adds them into one float32 array per parameter, in rank
order: every rank adds the same bytes in the same order, so every rank holds the same sums, bit for bit, and
computes the same AdamW update. The sums are held in memory (held.py) under the caller's tape, where
llm_global_grad_norm and llm_adamw_step read them, exactly as after a single-node backward.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pg_llm.kernels.held import start
from pg_llm.kernels.runtime import error
from pg_llm.kernels.tiles import floats

FETCH = 16  # tiles in Python memory at a time
EQ = 'OPERATOR(pg_catalog.=)'
WHERE = (f"g.cluster {EQ} %s AND g.model {EQ} %s AND g.nonce {EQ} %s AND g.rank {EQ} %s")
LOCAL = ("SELECT g.name, g.tr, g.tc, g.data FROM llm_internal.llm_dp_grad AS g WHERE "
         + WHERE % ('$1', '$2', '$3', '$4'))
REMOTE = "SELECT t.name, t.tr, t.tc, t.data FROM %s.dblink($1, $2) AS t(name TEXT, tr INT, tc INT, data BYTEA)"


def _plans(plpy: Any, GD: dict, schema: str) -> tuple[Any, Any]:
    key = 'llm_dp_plans'
    plans = GD.get(key)
    if plans is None or plans[0] != schema:
        local = plpy.prepare(LOCAL, ['text', 'text', 'text', 'int'])
        remote = plpy.prepare(REMOTE % plpy.quote_ident(schema), ['text', 'text'])
        plans = GD[key] = (schema, local, remote)
    return plans[1], plans[2]


def dp_sum_kernel(plpy: Any, GD: dict, tape: int, cluster: str, model: str, nonce: str, ranks: Sequence[int],
                  me: int, names: Sequence[str], gids: Sequence[int], geoms: Sequence[int], counts: Sequence[int],
                  schema: str) -> list[bool]:
    """llm_mk_dp_sum: the sum over ranks (in the order of `ranks`) of their gradient tiles for this step
    (nonce), held in memory under tape as gradient tensor gids[i] of parameter names[i] (geometry geoms[4i:4i+4]
    = rows, cols, tile rows, tile cols); returns which parameters received a gradient. counts[k]: the tiles
    rank ranks[k] wrote in phase 1 (each must arrive, no more). Peers are read through dblink connection
    'pg_llm_dp_peer_<rank>' (dblink in schema `schema`)."""
    local, remote = _plans(plpy, GD, schema)
    index = {n: i for i, n in enumerate(names)}
    sums: list[np.ndarray | None] = [None] * len(names)
    for k, r in enumerate(ranks):
        if r == me:
            cur = plpy.cursor(local, [cluster, model, nonce, r])
        else:
            q = ("SELECT g.name, g.tr, g.tc, g.data FROM llm_internal.llm_dp_grad AS g WHERE "
                 + WHERE % tuple(plpy.quote_literal(str(v)) for v in (cluster, model, nonce, r)))
            cur = plpy.cursor(remote, ['pg_llm_dp_peer_%d' % r, q])
        n = 0
        while True:
            batch = cur.fetch(FETCH)
            if not batch:
                break
            for row in batch:
                i = index.get(row['name'])
                if i is None:
                    error('pg_llm: llm_cluster_train_step: rank %d sent a gradient of "%s", which model "%s" has no '
                          'parameter of' % (r, row['name'], model))
                rows, cols, th, tw = geoms[4 * i:4 * i + 4]
                if sums[i] is None:
                    sums[i] = np.zeros((rows, cols), dtype=np.float32)
                dst = sums[i][row['tr'] * th:(row['tr'] + 1) * th, row['tc'] * tw:(row['tc'] + 1) * tw]
                src = floats(row['data'])
                if src.size != dst.size:
                    error('pg_llm: llm_cluster_train_step: tile (%d, %d) of the gradient of "%s" from rank %d has %d '
                          'floats, not %d' % (row['tr'], row['tc'], row['name'], r, src.size, dst.size))
                dst += src.reshape(dst.shape)
                n += 1
        if n != counts[k]:
            error('pg_llm: llm_cluster_train_step: %d gradient tiles of rank %d arrived, it wrote %d'
                  % (n, r, counts[k]),
                  hint='Another step of this model overwrote them (one training run per model and cluster at a '
                       'time); run the step again.')
    held = start(GD, tape)['grads']
    for i, a in enumerate(sums):
        if a is not None:
            held[gids[i]] = a
    return [a is not None for a in sums]
