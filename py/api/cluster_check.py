"""llm_cluster_check (and the checks every sync makes first): each rank answers through PL/Proxy, in parallel,
with its pg_llm build, its database's identity and the model's config, step and checksum; a rank that differs
from the coordinator is refused with a pg_llm: error naming the rank, and a HINT saying what to fix.

Emitted into sql/api/cluster.sql by pg_llm.api.cluster (not a generator module of its own).
"""
from __future__ import annotations

from pg_llm.api.cluster_rank import INFO_COLS
from pg_llm.gen.emit import function, plpgsql
from pg_llm.gen.surface import INTERNAL

# libpq's words for a connection that is dead: PL/Proxy reuses a connection used in the last 10 s without checking
# it, so its first call after a rank restarted fails on one; the same call again connects anew (nothing else is
# retried: a missing user mapping, say, must fail)
STALE = "'server closed the connection unexpectedly|no connection to the server|terminating connection'"

WHERE = "rank %s of cluster \"%s\" (database \"%s\")"
SYNC_HINT = "format('SELECT * FROM llm_cluster_sync(%L, %L) replicates the coordinator''s model to every rank.', " \
            "p_model, p_cluster)"


def _inspect() -> str:
    config_diff = """
        SELECT string_agg(format('%s %s there, %s here', k.key, coalesce(r.config -> k.key, 'null'),
                                 coalesce(v_me.config -> k.key, 'null')), ', ' ORDER BY k.key)
        FROM jsonb_object_keys(v_me.config) AS k(key)
        WHERE r.config -> k.key IS DISTINCT FROM v_me.config -> k.key"""
    diverging = f"""
        SELECT string_agg(format('%s (%s)', coalesce(a.name, b.name), coalesce(a.role, b.role)), ', '
                          ORDER BY coalesce(a.name, b.name), coalesce(a.role, b.role))
        FROM {INTERNAL}.llm_cluster_px_sums(p_cluster, ARRAY[r.rank], p_model) AS a
        FULL JOIN llm_cluster_tensor_sums(p_model) AS b ON b.name = a.name AND b.role = a.role
        WHERE a.checksum IS DISTINCT FROM b.checksum"""
    ask = f"""
        SELECT jsonb_agg(to_jsonb(i)) FROM {INTERNAL}.llm_cluster_px_info(p_cluster, v_ranks, p_model, v_me.config,
                                                                        NOT coalesce(p_sync, FALSE)) AS i"""
    declare = "v_ranks INT[]; v_me RECORD; r RECORD; v_rows JSONB; v_nodes TEXT[]; v_problem TEXT; v_where TEXT;"
    body = plpgsql(declare, f"""
        v_ranks := llm_cluster_ranks_of(p_cluster);
        SELECT * INTO v_me FROM llm_cluster_rank_info(ARRAY[-1], p_model, NULL, p_sync IS NULL OR NOT p_sync) AS i;
        v_nodes := ARRAY[v_me.node];
        FOR i IN 1 .. 2 LOOP
          BEGIN
            v_rows := (
              @ask
            );
            EXIT;
          EXCEPTION WHEN OTHERS THEN
            CONTINUE WHEN i = 1 AND SQLERRM ~ {STALE};  -- a connection dead since its last use: once more
            RAISE EXCEPTION 'pg_llm: cluster "%": a rank did not answer: %', p_cluster, SQLERRM
              USING HINT = format('Every rank of SELECT * FROM llm_cluster_ranks WHERE cluster = %L needs a running '
                                  'server that accepts the mapped role, and pg_llm installed.', p_cluster);
          END;
        END LOOP;
        FOR r IN SELECT * FROM jsonb_to_recordset(v_rows) AS i({INFO_COLS}) ORDER BY i.rank LOOP
          v_where := format('{WHERE}', r.rank, p_cluster, r.dbname);
          IF r.build IS DISTINCT FROM v_me.build THEN
            RAISE EXCEPTION 'pg_llm: % runs pg_llm build %, the coordinator runs %', v_where, r.build, v_me.build
              USING HINT = 'Install the coordinator''s pg_llm on the rank (psql -f install.sql into a fresh '
                           'database, ALTER EXTENSION pg_llm UPDATE, or pg-llm cluster up --recreate for local '
                           'ranks), then sync the model again.';
          END IF;
          IF r.node = ANY (v_nodes) THEN
            RAISE EXCEPTION 'pg_llm: % is %', v_where,
              CASE WHEN r.node = v_me.node THEN 'the coordinator''s own database' ELSE 'another rank''s database' END
              USING HINT = 'A rank is a database of its own: llm_cluster_drop the cluster and register other '
                           'databases.';
          END IF;
          v_nodes := v_nodes || r.node;
        END LOOP;
        FOR r IN SELECT * FROM jsonb_to_recordset(v_rows) AS i({INFO_COLS}) ORDER BY i.rank LOOP
          v_where := format('{WHERE}', r.rank, p_cluster, r.dbname);
          IF p_sync THEN
            IF r.conflict IS NOT NULL THEN
              RAISE EXCEPTION 'pg_llm: %: %', v_where, r.conflict
                USING HINT = 'Give the coordinator''s config another name, or drop those models on the rank.';
            END IF;
            IF NOT r.writable THEN
              RAISE EXCEPTION 'pg_llm: the role of % may not write model "%" there', v_where, p_model
                USING HINT = 'Map a role that owns the model on the rank (or llm_admin) in the user mappings.';
            END IF;
          ELSE
            IF r.config IS NULL THEN
              RAISE EXCEPTION 'pg_llm: % has no model "%"', v_where, p_model
                USING HINT = {SYNC_HINT};
            END IF;
            IF r.config IS DISTINCT FROM v_me.config THEN
              v_problem := (
                @config_diff
              );
              RAISE EXCEPTION 'pg_llm: model "%" has another config on %: %', p_model, v_where, v_problem
                USING HINT = {SYNC_HINT};
            END IF;
            IF r.step IS DISTINCT FROM v_me.step THEN
              RAISE EXCEPTION 'pg_llm: model "%" is at step % on %, at step % on the coordinator', p_model, r.step,
                v_where, v_me.step USING HINT = {SYNC_HINT};
            END IF;
            IF r.checksum IS DISTINCT FROM v_me.checksum THEN
              v_problem := (
                @diverging
              );
              RAISE EXCEPTION 'pg_llm: the parameters of model "%" diverge on % from the coordinator''s: %',
                p_model, v_where, coalesce(v_problem, 'tensors differ')
                USING HINT = {SYNC_HINT};
            END IF;
          END IF;
          rank := r.rank; dbname := r.dbname; build := r.build; step := r.step; tensors := r.tensors;
          bytes := r.bytes; checksum := r.checksum;
          RETURN NEXT;
        END LOOP;
    """, config_diff=config_diff, diverging=diverging, ask=ask)
    return function("llm_cluster_inspect", "p_cluster TEXT, p_model TEXT, p_sync BOOLEAN",
                    "TABLE(rank INT, dbname TEXT, build TEXT, step BIGINT, tensors BIGINT, bytes BIGINT, "
                    "checksum TEXT)", "#variable_conflict use_column\n" + body, volatility="VOLATILE",
                    note="Ask every rank of a cluster (PL/Proxy, in parallel) and refuse the first that differs from "
                    "the coordinator: another pg_llm build, the coordinator's own database (or another rank's); for "
                    "a sync (p_sync) a config it could not write or a model its role may not change; for a check "
                    "a missing model, another config, another step or diverging tensors (named).")


def _check() -> str:
    body = plpgsql("", """
        PERFORM llm_cluster_require();
        PERFORM llm_cluster_ranks_of(cluster);
        PERFORM llm_model_check(model);
        RETURN QUERY SELECT * FROM llm_cluster_inspect(cluster, model, FALSE);
    """)
    return function("llm_cluster_check", "cluster TEXT, model TEXT",
                    "TABLE(rank INT, dbname TEXT, build TEXT, step BIGINT, tensors BIGINT, bytes BIGINT, "
                    "checksum TEXT)", body,
                    note="Verify that every rank of a cluster runs the coordinator's pg_llm build and holds model "
                    "`model` as the coordinator does (config, step, checksums of parameters and AdamW moments); a "
                    "row per rank, or a pg_llm: error naming the first rank that differs and how to fix it.")


def inspect() -> str:
    return "\n".join([_inspect(), _check()])
