"""Per-backend weight cache: assembled numpy blocks of durable tensors kept in PL/Python's GD across calls
(the SQL functions reporting and clearing it: py/ops/weight_cache.py).

Why: a generated token reads every weight once (124M floats for GPT-2 small); streaming ~500 MB of tiles out
of llm_tile (bytea, detoast, copy into numpy) per token was ~90 % of a decoding step. Kernels ask for an
operand block of a durable tensor (id > 0: params, adam state) instead of reading its tiles: cached_block
(llm_mk_matmul_panel's panels), cached_tensors (whole tensors: llm_mk_gpt2_block_step). cached_rows mirrors a
tensor stored one row per tile that only grows (a KV cache, scratch): the rows it holds are reused.

Exactly correct under updates: an entry is (fingerprint, array), keyed by (tensor id, geometry, tile box). The
fingerprint lists (tr, tc, tableoid, relfilenode, ctid, xmin) of the block's llm_tile rows visible in the
caller's snapshot; reading it never detoasts a payload (an index scan, ~1-3 us a tile). A hit needs the SAME
row versions, and a row version is identified by (relfilenode, ctid, xmin) for as long as anyone can see it:
- its payload never changes: UPDATE writes a new version (new ctid in the same transaction, new xmin in
  another);
- plain VACUUM never moves a version; a slot is reused only after its version is dead to every snapshot, and
  the new occupant's xmin is a running transaction, which never wrote the dead version (a transaction's own
  deleted versions are not prunable before it ends; an aborted (sub)transaction's xid is never assigned
  again): so a version written then rolled back (transaction or savepoint) never reappears with the same
  fingerprint (tests/test_weight_cache.py reuses such a slot);
- VACUUM FULL, CLUSTER and TRUNCATE write a new relfilenode. It is needed: a rewrite keeps xmin, and two
  versions of a tile written by one transaction share (tr, tc, xmin), so the survivor can land at the dropped
  one's ctid (the test builds exactly that).
Each backend validates in its own snapshot (other sessions' commits, REPEATABLE READ, same-transaction
updates). Only 32-bit xid wraparound could alias (a version with the cached one's raw xmin mod 2^32 in the very
same slot, every other tile unchanged). On a miss the fingerprint and the payloads come from ONE query, so the
stored pair is consistent even in a VOLATILE kernel.

Memory: an LRU over bytes, budget pg_llm.weight_cache_mb (default 2048; 0 disables the cache and frees it);
a block larger than the budget is used but not kept. Memory is per backend (Python heap, outside work_mem);
entries of dropped tensors stay until evicted. llm_weight_cache_stats() reports it, llm_weight_cache_clear()
empties it and resets the counters, llm_weight_cache_forget(ids) drops some tensors (a finished generation's
KV caches).
"""

from __future__ import annotations

import collections

import numpy as np

from pg_llm.kernels.tiles import floats

DEFAULT_MB = 2048  # a training backend keeps params and both AdamW moments: 1.5 GB at GPT-2 small

FP_ROW = ("t.tr || ':' || t.tc || ':' || t.tableoid::TEXT || ':' || pg_relation_filenode(t.tableoid)::TEXT || ':' "
          "|| t.ctid::TEXT || ':' || t.xmin::TEXT")  # concatenation: half the cost of format()
BOX = "t.tensor_id = $1 AND t.tr >= $2 AND t.tr < $3 AND t.tc >= $4 AND t.tc < $5"


def weight_cache(GD):
    """The backend's cache state in GD (created on first use)."""
    c = GD.get('llm_weight_cache')
    if c is None:
        c = GD['llm_weight_cache'] = {'lru': collections.OrderedDict(), 'bytes': 0, 'hits': 0, 'misses': 0,
                                      'evictions': 0}
    return c


def cache_budget(plpy, GD):
    """pg_llm.weight_cache_mb in bytes (default DEFAULT_MB MiB; 0 disables). Shrinks the cache to it."""
    plan = GD.get('llm_wc_budget_plan')
    if plan is None:
        plan = GD['llm_wc_budget_plan'] = plpy.prepare(
            "SELECT current_setting('pg_llm.weight_cache_mb', TRUE) AS v", [])
    v = plpy.execute(plan)[0]['v']
    try:
        mb = DEFAULT_MB if v is None or v.strip() == '' else float(v)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < float('inf'):
        plpy.error('pg_llm: pg_llm.weight_cache_mb must be a number of megabytes >= 0, got %r' % v,
                   hint='0 disables the weight cache; the default is %d.' % DEFAULT_MB)
    budget = int(mb * 1048576)
    if 'llm_weight_cache' in GD:
        cache_evict(GD['llm_weight_cache'], budget)
    return budget


def cache_evict(c, budget):
    """Drop least recently used entries until the cache holds at most budget bytes."""
    lru = c['lru']
    while c['bytes'] > budget and lru:
        _, (_, m) = lru.popitem(last=False)
        c['bytes'] -= m.nbytes
        c['evictions'] += 1


def cache_take(c, key, fp):
    """The cached array of key if it was built from the row versions fp (a hit, now most recently used); else
    None (a miss), the stale entry dropped."""
    entry = c['lru'].get(key)
    if entry is not None and entry[0] == fp:
        c['lru'].move_to_end(key)
        c['hits'] += 1
        return entry[1]
    c['misses'] += 1
    if entry is not None:
        del c['lru'][key]
        c['bytes'] -= entry[1].nbytes
    return None


def cache_put(c, key, fp, m, budget):
    """Keep m (read-only from now on) for key, built from the row versions fp, within budget bytes."""
    if m.nbytes <= budget:
        m.flags.writeable = False
        c['lru'][key] = (fp, m)
        c['bytes'] += m.nbytes
        cache_evict(c, budget)
    return m


def tile_rows(plpy, GD, tensor_id, box):
    """(fingerprint, payloads) of the tiles box = [r0, r1, c0, c1] of a tensor in (tr, tc) order, from ONE
    query: the fingerprint describes exactly the row versions the payloads come from."""
    plan = GD.get('llm_wc_load_plan')
    if plan is None:
        plan = GD['llm_wc_load_plan'] = plpy.prepare(
            "SELECT %s AS fp, t.data FROM llm_tile AS t WHERE %s ORDER BY t.tr, t.tc" % (FP_ROW, BOX),
            ['bigint', 'int', 'int', 'int', 'int'])
    rows = plpy.execute(plan, [tensor_id] + list(box))
    return ' '.join([r['fp'] for r in rows]), [r['data'] for r in rows]


def cached_block(plpy, GD, tensor_id, geom, box, build, budget):
    """The block of durable tensor tensor_id made of its tiles box = [r0, r1, c0, c1] (tile rows and columns,
    half-open): from the cache when the visible row versions are those it was built from, else built by
    build(payloads in (tr, tc) order) and kept under the byte budget. geom (whatever else build depends on:
    shape, tiling) is part of the key."""
    c = weight_cache(GD)
    key = (tensor_id, tuple(geom), tuple(box))
    fp = None
    if key in c['lru']:
        plan = GD.get('llm_wc_fp_plan')
        if plan is None:
            plan = GD['llm_wc_fp_plan'] = plpy.prepare(
                "SELECT string_agg(%s, ' ' ORDER BY t.tr, t.tc) AS fp FROM llm_tile AS t WHERE %s" % (FP_ROW, BOX),
                ['bigint', 'int', 'int', 'int', 'int'])
        fp = plpy.execute(plan, [tensor_id] + list(box))[0]['fp']
    m = cache_take(c, key, fp)
    if m is None:
        fp, tiles = tile_rows(plpy, GD, tensor_id, box)
        m = cache_put(c, key, fp, build(tiles), budget)
    return m


def _tensors_info(plpy, GD, ids):
    """{id: row (id, shape, tile, fp)} of durable tensors: shape, tiling and the fingerprint of all their tiles."""
    plan = GD.get('llm_wc_tensors_plan')
    if plan is None:
        plan = GD['llm_wc_tensors_plan'] = plpy.prepare(
            "SELECT v.id, v.shape, v.tile, (SELECT string_agg(%s, ' ' ORDER BY t.tr, t.tc) FROM llm_tile AS t "
            "WHERE t.tensor_id = v.id) AS fp FROM llm_tensor AS v WHERE v.id = ANY($1) AND v.id > 0" % FP_ROW,
            ['bigint[]'])
    return {r['id']: r for r in plpy.execute(plan, [list(ids)])}


def _whole(r):
    """(key, geom + box) of a whole tensor's entry, from its _tensors_info row."""
    shape, tile = r['shape'], r['tile']
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    geom = [rows, cols, tile[0], tile[1]]
    box = [0, -(-rows // tile[0]), 0, -(-cols // tile[1])]
    return (r['id'], tuple(geom), tuple(box)), geom + box


def cached_tensors(plpy, GD, ids, build, budget):
    """Whole tensors by id, in the order of ids: build(payloads in (tr, tc) order, geom) with geom = [rows, cols,
    tile_rows, tile_cols, 0, tile rows, 0, tile cols] on a miss. One query gives every geometry and
    fingerprint; each miss is one more query. Durable tensors only (ids > 0); budget 0 reads them all."""
    found = _tensors_info(plpy, GD, ids)
    c = weight_cache(GD)
    out = []
    for tid in ids:
        r = found.get(tid)
        if r is None:
            plpy.error('pg_llm: durable tensor id %s does not exist' % tid)
        key, geom = _whole(r)
        m = cache_take(c, key, r['fp']) if budget else None
        if m is None:
            fp, tiles = tile_rows(plpy, GD, tid, geom[4:])
            m = build(tiles, geom)
            if budget:
                cache_put(c, key, fp, m, budget)
        out.append(m)
    return out


def adopt_tensor(plpy, GD, tid, m, budget):
    """Keep m as durable tensor tid's whole-tensor entry (cached_tensors'), fingerprinted from the row versions
    visible now: for a kernel that has just written every tile of tid from m (AdamW), so that the next reader
    (the next step's forward) takes m instead of reading the tiles back."""
    r = _tensors_info(plpy, GD, [tid]).get(tid)
    if budget and r is not None:
        key, geom = _whole(r)
        if m.shape == (geom[0], geom[1]):
            c = weight_cache(GD)
            old = c['lru'].pop(key, None)
            if old is not None:
                c['bytes'] -= old[1].nbytes
            cache_put(c, key, r['fp'], m, budget)


def cached_rows(plpy, GD, tensor_id, n, width, budget):
    """Rows 0 .. n-1 of a tensor stored one row per tile (tiles (1, width), tc = 0: a KV cache) as a read-only
    (n, width) view of the backend's mirror of it: the leading rows whose versions the mirror holds are reused,
    the others read (a decoding step reads the one row appended since the last step; a hit = some rows reused).
    Raises unless the tensor holds exactly those n rows."""
    plan = GD.get('llm_wc_rows_fp_plan')
    if plan is None:
        plan = GD['llm_wc_rows_fp_plan'] = plpy.prepare(
            "SELECT string_agg(%s, ' ' ORDER BY t.tr, t.tc) AS fp FROM llm_tile AS t WHERE t.tensor_id = $1"
            % FP_ROW, ['bigint'])
    fp = plpy.execute(plan, [tensor_id])[0]['fp']
    fps = fp.split(' ') if fp else []
    if len(fps) != n:
        plpy.error('pg_llm: attention_cached: cache (tensor id %s) holds %d positions, expected exactly 0 .. %d'
                   % (tensor_id, len(fps), n - 1))
    c = weight_cache(GD)
    key = (tensor_id, 'rows', width)
    old, arr, k = (), None, 0
    entry = c['lru'].pop(key, None) if budget else None
    if entry is not None:
        old, arr = entry
        c['bytes'] -= arr.nbytes
        while k < min(len(old), n) and old[k] == fps[k]:
            k += 1
    if budget:
        c['hits' if k else 'misses'] += 1
    data = []
    if k < n:
        new_fp, data = tile_rows(plpy, GD, tensor_id, [k, 2 ** 31 - 1, 0, 2 ** 31 - 1])
        if new_fp.split(' ') != fps[k:]:
            plpy.error('pg_llm: attention_cached: cache (tensor id %s) changed while read' % tensor_id)
        for i, d in enumerate(data):
            if not fps[k + i].startswith('%d:0:' % (k + i)) or len(d) != 4 * width:
                plpy.error('pg_llm: attention_cached: cache (tensor id %s) row %d is not tile (%d, 0) of %d floats'
                           % (tensor_id, k + i, k + i, width), hint='A cache holds one tile (1, 2C) per position.')
    if arr is None or arr.shape[0] < n:
        grown = np.empty((max(n, 64, 0 if arr is None else 2 * arr.shape[0]), width), dtype=np.float32)
        if k:
            grown[:k] = arr[:k]
        arr = grown
    if data:
        arr[k:n] = floats(b''.join(data)).reshape(-1, width)
    if budget and arr.nbytes <= budget:
        c['lru'][key] = (fps, arr)
        c['bytes'] += arr.nbytes
        cache_evict(c, budget)
    view = arr[:n]
    view.flags.writeable = False
    return view


# ---- llm_weight_cache_stats / _clear / _forget ----------------------------------------------------------------

def stats(GD):
    """[(tensors, entries, bytes, hits, misses, evictions)] of this backend's cache."""
    c = GD.get('llm_weight_cache')
    if c is None:
        return [(0, 0, 0, 0, 0, 0)]
    return [(len({k[0] for k in c['lru']}), len(c['lru']), c['bytes'], c['hits'], c['misses'], c['evictions'])]


def clear(GD):
    """Empty the cache and reset its counters; the bytes freed."""
    c = GD.pop('llm_weight_cache', None)
    return 0 if c is None else c['bytes']


def forget(GD, ids):
    """Drop the entries of these tensors; the bytes freed."""
    c = GD.get('llm_weight_cache')
    if c is None:
        return 0
    gone = set(ids)
    freed = 0
    for key in [k for k in c['lru'] if k[0] in gone]:
        freed += c['lru'].pop(key)[1].nbytes
    c['bytes'] -= freed
    return freed
