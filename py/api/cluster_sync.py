"""llm_cluster_sync(model, cluster): replicate a model's durable state (config, parameters, AdamW moments, step)
from the coordinator to every rank of a cluster, and verify each rank's checksum.

1. Checks, before anything is written: plproxy and postgres_fdw installed, the cluster and the model known,
   every rank answering (PL/Proxy, in parallel) with the coordinator's pg_llm build, none of them the
   coordinator itself, each able to take the config and write the model (llm_cluster_inspect).
2. Per rank: llm_cluster_rank_prepare through PL/Proxy (autocommitted on the rank) makes the config, model
   row and tensor catalog rows the coordinator's and returns the rank's tensor ids (tensor ids differ per
   rank, and postgres_fdw's INSERT would not apply the rank's column defaults anyway); then, through
   postgres_fdw in the coordinator's transaction, the rank's tiles of those tensors are deleted and the
   coordinator's inserted (batch_size 16 tiles a round trip), the rank's step set, and the per-tile md5s the
   rank computes over what it now holds (same remote transaction) are aggregated into its checksum, which must
   equal the coordinator's or the whole sync rolls back.
3. The coordinator's commit commits every rank's tile transaction (postgres_fdw, parallel_commit). Not
   two-phase: a failure during that commit can leave some ranks synced and others at their old tiles (under
   the new catalog rows); llm_cluster_check then refuses the cluster until a sync succeeds.

Emitted into sql/api/cluster.sql by pg_llm.api.cluster.
"""
from __future__ import annotations

from pg_llm.api.cluster_rank import MODEL_SUM, STATE, tensor_sums
from pg_llm.gen.emit import function, plpgsql
from pg_llm.gen.sqlfmt import sql
from pg_llm.gen.surface import INTERNAL

FOREIGN = f"{INTERNAL}.cluster_rank_foreign"  # stands for the rank's foreign table in the parse-checked SQL


def _dynamic(text: str) -> str:
    """A statement on a rank's foreign table, parse-checked by sqlglot, as the literal of a format() call whose
    %I is the foreign table's name."""
    checked = " ".join(sql(text).split())  # one line (no literal here holds two spaces in a row)
    assert "%" not in checked and FOREIGN in checked
    lit = checked.replace(FOREIGN, f"{INTERNAL}.%I").replace("'", "''")
    return "'" + lit + "'"


def sync() -> str:
    delete = _dynamic(f"DELETE FROM {FOREIGN} AS t WHERE t.tensor_id = ANY ($1)")
    insert = _dynamic(f"""
        INSERT INTO {FOREIGN} (tensor_id, tr, tc, data)
        SELECT m.id, t.tr, t.tc, t.data
        FROM jsonb_to_recordset($1) AS m(name TEXT, role TEXT, id BIGINT)
        JOIN llm_tensor AS v ON v.model = $2 AND v.name = m.name AND v.role = m.role AND v.id > 0
        JOIN llm_tile AS t ON t.tensor_id = v.id""")
    step = _dynamic(f"UPDATE {FOREIGN} AS m SET step = $1 WHERE m.name = $2")
    verify = _dynamic(f"SELECT count(*)::BIGINT, coalesce(sum(x.bytes), 0)::BIGINT, {MODEL_SUM} "
                      f"FROM ({tensor_sums(FOREIGN, '$1')}) AS x")
    queries = {
        "tensors": f"""
            SELECT jsonb_agg(jsonb_build_object('name', v.name, 'role', v.role, 'shape', v.shape, 'tile', v.tile))
            FROM llm_tensor AS v WHERE v.model = v_model AND v.role IN {STATE} AND v.id > 0""",
        "prepare": f"""
            SELECT jsonb_agg(jsonb_build_object('name', p.name, 'role', p.role, 'id', p.id))
            FROM {INTERNAL}.llm_cluster_px_prepare(v_cluster, ARRAY[v_rank], v_model, v_config, v_tensors) AS p""",
    }
    body = "#variable_conflict use_column\n" + plpgsql("""
        c llm_model_config; v_model TEXT; v_cluster TEXT; v_ranks INT[]; v_rank INT; v_step BIGINT; v_config JSONB;
        v_tensors JSONB; v_me RECORD; v_map JSONB; v_pre TEXT; v_t0 TIMESTAMPTZ; v_n BIGINT; v_bytes BIGINT;
        v_sum TEXT;
    """, f"""
        v_model := llm_cluster_sync.model;
        v_cluster := llm_cluster_sync.cluster;
        PERFORM llm_cluster_require();
        v_ranks := llm_cluster_ranks_of(v_cluster);
        c := llm_model_check(v_model);
        -- a training step of the model cannot commit while this transaction copies it
        SELECT m.step INTO v_step FROM llm_model AS m WHERE m.name = v_model FOR SHARE;
        v_config := to_jsonb(c) - 'owner';
        v_tensors := (
          @tensors
        );
        SELECT s.tensors, s.bytes, s.checksum INTO v_me FROM llm_cluster_model_sum(v_model) AS s;
        PERFORM llm_cluster_inspect(v_cluster, v_model, TRUE);
        -- ---- nothing was written above this line ----
        FOREACH v_rank IN ARRAY v_ranks LOOP
          v_t0 := clock_timestamp();
          v_pre := 'llm_rank_' || v_cluster || '_' || v_rank;
          BEGIN
            v_map := (
              @prepare
            );
          EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'pg_llm: llm_cluster_sync: rank % of cluster "%" refused the model: %', v_rank, v_cluster,
              SQLERRM USING HINT = 'Fix what the rank says, then sync again: ranks synced before it keep their '
                                   'catalog rows, and no tile changed anywhere.';
          END;
          EXECUTE format({delete}, v_pre || '_tile')
            USING ARRAY(SELECT (e ->> 'id')::BIGINT FROM jsonb_array_elements(v_map) AS e);
          EXECUTE format({insert}, v_pre || '_tile') USING v_map, v_model;
          EXECUTE format({step}, v_pre || '_model') USING v_step, v_model;
          EXECUTE format({verify}, v_pre || '_md5') INTO v_n, v_bytes, v_sum USING v_model;
          IF v_sum IS DISTINCT FROM v_me.checksum OR v_n <> v_me.tensors THEN
            RAISE EXCEPTION 'pg_llm: llm_cluster_sync: rank % of cluster "%" holds checksum % (% tensors), not %',
              v_rank, v_cluster, v_sum, v_n, v_me.checksum
              USING HINT = 'Nothing was committed. Check the rank''s disk and server log, then sync again.';
          END IF;
          rank := v_rank; tensors := v_n; bytes := v_bytes; checksum := v_sum;
          seconds := extract(epoch FROM clock_timestamp() - v_t0);
          RETURN NEXT;
        END LOOP;
    """, **queries)
    return function("llm_cluster_sync", "model TEXT, cluster TEXT",
                    "TABLE(rank INT, tensors BIGINT, bytes BIGINT, checksum TEXT, seconds FLOAT8)", body,
                    settings=("jit = off",),
                    note="Replicate a model (config, parameters, AdamW moments, step) from this coordinator to every "
                    "rank of a cluster and verify each rank's checksum (per-tile md5s) equals the coordinator's; a "
                    "row per rank. Bad input (unknown cluster or model, plproxy or postgres_fdw missing, a rank with "
                    "another pg_llm build) errors before anything is written.")
