"""The coordinator's connections to the ranks of a data-parallel step (api/cluster_train.py): one dblink
connection per rank, pg_llm_dp_<rank>, opened through the rank's postgres_fdw server (its options and the
caller's user mapping), statements sent to every rank at once and their results gathered, the first error
re-raised as the rank raised it (message, HINT, SQLSTATE) with the rank in its DETAIL.

Emitted into sql/api/cluster_train.sql by pg_llm.api.cluster_train.
"""
from __future__ import annotations

from pg_llm.gen.emit import function, plpgsql

CONN = "'pg_llm_dp_' || {r}"


def io() -> str:
    body = plpgsql("v_r INT; v_conn TEXT;", f"""
        FOREACH v_r IN ARRAY p_ranks LOOP
          v_conn := {CONN.format(r='v_r')};
          IF v_conn = ANY (coalesce(dblink_get_connections(), '{{}}')) THEN
            PERFORM dblink_disconnect(v_conn);  -- left open by an interrupted earlier call of this session
          END IF;
          BEGIN
            PERFORM dblink_connect(v_conn, 'llm_rank_' || p_cluster || '_' || v_r);
          EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'pg_llm: rank % of cluster "%" did not answer: %', v_r, p_cluster, SQLERRM
              USING HINT = format('Every rank of SELECT * FROM llm_cluster_ranks WHERE cluster = %L needs a running '
                                  'server that accepts the mapped role (docs/scaleout.md).', p_cluster);
          END;
          PERFORM dblink_exec(v_conn, 'SET search_path = pg_catalog, pg_temp');  -- every name we send is qualified
          -- a rank's statement stops within a second of this session's end (a crash, pg_terminate_backend)
          PERFORM dblink_exec(v_conn, 'SET client_connection_check_interval = 1000');
        END LOOP;
    """)
    out = [function("llm_dp_open", "p_cluster TEXT, p_ranks INT[]", "VOID", body, note="""
        Open dblink connection pg_llm_dp_<rank> to every rank of p_ranks, through its postgres_fdw server
        llm_rank_<cluster>_<rank> (options and the caller's user mapping).""")]
    body = plpgsql("v_r INT;", f"""
        FOREACH v_r IN ARRAY p_ranks LOOP
          IF {CONN.format(r='v_r')} = ANY (coalesce(dblink_get_connections(), '{{}}')) THEN
            PERFORM dblink_disconnect({CONN.format(r='v_r')});  -- an open transaction there rolls back
          END IF;
        END LOOP;
    """)
    out.append(function("llm_dp_close", "p_ranks INT[]", "VOID", body, note="""
        Close the connections llm_dp_open opened (a rank's open, unprepared transaction then rolls back)."""))
    body = plpgsql("", f"""
        BEGIN
          LOOP
            EXIT WHEN NOT EXISTS (SELECT 1 FROM unnest(p_ranks) AS x(r)
                                  WHERE dblink_is_busy({CONN.format(r='x.r')}) = 1);
            PERFORM pg_sleep(0.005);  -- where a cancel or statement_timeout of the caller lands
          END LOOP;
        EXCEPTION WHEN query_canceled THEN
          PERFORM dblink_cancel_query({CONN.format(r='x.r')}) FROM unnest(p_ranks) AS x(r);
          RAISE;
        END;
    """)
    out.append(function("llm_dp_wait", "p_ranks INT[]", "VOID", body, note="""
        Wait until no rank of p_ranks is busy; a cancel of the caller cancels the ranks' statements too."""))
    body = plpgsql("v_out JSONB[] := '{}'; v_bad INT; v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT;", f"""
        FOR i IN 1 .. cardinality(p_ranks) LOOP
          IF dblink_send_query({CONN.format(r='p_ranks[i]')}, p_sqls[i]) <> 1 THEN
            RAISE EXCEPTION 'pg_llm: rank % of cluster "%" did not take the statement: %', p_ranks[i], p_cluster,
              dblink_error_message({CONN.format(r='p_ranks[i]')})
              USING HINT = 'Is the rank''s server running and reachable? SELECT * FROM llm_cluster_ranks.';
          END IF;
        END LOOP;
        PERFORM llm_dp_wait(p_ranks);
        FOR i IN 1 .. cardinality(p_ranks) LOOP
          BEGIN
            v_out[i] := (SELECT x.v FROM dblink_get_result({CONN.format(r='p_ranks[i]')}) AS x(v JSONB) LIMIT 1);
          EXCEPTION WHEN OTHERS THEN
            IF v_bad IS NULL THEN
              GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                      v_state = RETURNED_SQLSTATE;
              v_bad := p_ranks[i];
            END IF;
          END;
          BEGIN
            PERFORM * FROM dblink_get_result({CONN.format(r='p_ranks[i]')}, FALSE) AS x(v JSONB);  -- the end
          EXCEPTION WHEN OTHERS THEN
            NULL;
          END;
        END LOOP;
        IF v_bad IS NOT NULL THEN
          PERFORM llm_reraise(v_msg, concat_ws(' ', nullif(v_detail, ''),
                              format('(raised on rank %s of cluster "%s")', v_bad, p_cluster)), v_hint, v_state);
        END IF;
        RETURN v_out;
    """)
    out.append(function("llm_dp_gather", "p_cluster TEXT, p_ranks INT[], p_sqls TEXT[]", "JSONB[]", body, note="""
        Send p_sqls[i] (a query of one JSONB column) to rank p_ranks[i], all at once, wait for all of them, and
        return each one's first row; the first rank that raised is re-raised with its message, HINT and SQLSTATE
        (the rank in the DETAIL) once every rank has answered."""))
    body = plpgsql("v_conn TEXT := 'pg_llm_dp_decide';", """
        PERFORM llm_loopback_connect(v_conn);
        PERFORM llm_loopback_run(v_conn, format('INSERT INTO llm_internal.llm_dp_decision (gid, cluster, model, step) '
                                                'SELECT g, %L, %L, %s FROM unnest(%L::TEXT[]) AS g', p_cluster,
                                                p_model, p_step, p_gids));
        PERFORM llm_loopback_close(v_conn);
    """)
    out.append(function("llm_dp_decide", "p_cluster TEXT, p_model TEXT, p_step INT, p_gids TEXT[]", "VOID", body,
                        note="""
        Record durably (committed through the loopback connection, before any rank commits) that the prepared
        transactions p_gids commit: llm_cluster_recover commits them where the coordinator could not."""))
    return "\n".join(out)
