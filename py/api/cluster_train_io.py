"""The coordinator's connections to the ranks of a data-parallel step (api/cluster_train.py): one dblink
connection per rank, pg_llm_dp_<rank>, opened through the rank's postgres_fdw server (its options and the
caller's user mapping), statements sent to every rank at once and their results gathered, the first error
re-raised as the rank raised it (message, HINT, SQLSTATE) with the rank in its DETAIL, unless a rank's connection
died: then a pg_llm error names that rank (the others' errors, a peer gone, follow from it) and what to do. A
loop's steps reuse the connections (llm_dp_open p_reuse).

Emitted into sql/api/cluster_train.sql by pg_llm.api.cluster_train.
"""
from __future__ import annotations

from pg_llm.gen.emit import function, plpgsql

CONN = "'pg_llm_dp_' || {r}"
# a rank's server went away (its connection failed: 08xxx; or its backend was shut down: 57P0x)
GONE = "({s} LIKE '08%' OR {s} IN ('57P01', '57P02', '57P03'))"
GONE_HINT = ("format('Nothing of the step is committed unless a WARNING said so. Once the rank accepts connections "
             "again, SELECT * FROM llm_cluster_recover(%L) resolves what the step left prepared there; then run the "
             "step again (CALL llm_cluster_train_run resumes at the ranks'' step).', p_cluster)")


def io() -> str:
    body = plpgsql("v_r INT; v_conn TEXT; v_id TEXT;", f"""
        FOREACH v_r IN ARRAY p_ranks LOOP
          v_conn := {CONN.format(r='v_r')};
          v_id := p_cluster || '/' || v_r;
          IF v_conn = ANY (coalesce(dblink_get_connections(), '{{}}')) THEN
            IF p_reuse THEN  -- a loop's next step: keep the rank's session (its weight cache) if it is alive
              BEGIN
                CONTINUE WHEN (SELECT x.v FROM dblink(v_conn, 'SELECT pg_catalog.current_setting(''pg_llm.dp_rank'', '
                                                              'TRUE)') AS x(v TEXT)) = v_id;
              EXCEPTION WHEN OTHERS THEN
                NULL;  -- gone (the rank restarted since): connect anew
              END;
            END IF;
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
          -- which rank this session serves (a reused connection is checked against it), also in pg_stat_activity
          PERFORM dblink_exec(v_conn, format('SET pg_llm.dp_rank = %L', v_id));
          PERFORM dblink_exec(v_conn, format('SET application_name = %L', left('pg_llm ' || v_id, 63)));
        END LOOP;
    """)
    out = [function("llm_dp_open", "p_cluster TEXT, p_ranks INT[], p_reuse BOOLEAN DEFAULT FALSE", "VOID", body,
                    note="""
        Open dblink connection pg_llm_dp_<rank> to every rank of p_ranks, through its postgres_fdw server
        llm_rank_<cluster>_<rank> (options and the caller's user mapping). p_reuse: keep a connection of this
        session to the same rank that still answers (a loop's steps share one session per rank).""")]
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
    body = plpgsql("""
        v_out JSONB[] := '{}'; v_bad INT; v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT; v_dead INT;
        v_dmsg TEXT; v_ddetail TEXT; v_dstate TEXT; e_msg TEXT; e_detail TEXT; e_hint TEXT; e_state TEXT;
    """, f"""
        FOR i IN 1 .. cardinality(p_ranks) LOOP
          IF dblink_send_query({CONN.format(r='p_ranks[i]')}, p_sqls[i]) <> 1 THEN
            RAISE EXCEPTION 'pg_llm: rank % of cluster "%" went away in the middle of a step: %', p_ranks[i],
              p_cluster, dblink_error_message({CONN.format(r='p_ranks[i]')})
              USING HINT = {GONE_HINT}, ERRCODE = 'connection_failure';
          END IF;
        END LOOP;
        PERFORM llm_dp_wait(p_ranks);
        FOR i IN 1 .. cardinality(p_ranks) LOOP
          e_state := NULL;
          BEGIN
            v_out[i] := (SELECT x.v FROM dblink_get_result({CONN.format(r='p_ranks[i]')}) AS x(v JSONB) LIMIT 1);
          EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS e_msg = MESSAGE_TEXT, e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT,
                                    e_state = RETURNED_SQLSTATE;
            IF v_bad IS NULL THEN
              v_bad := p_ranks[i]; v_msg := e_msg; v_detail := e_detail; v_hint := e_hint; v_state := e_state;
            END IF;
          END;
          BEGIN
            PERFORM * FROM dblink_get_result({CONN.format(r='p_ranks[i]')}, FALSE) AS x(v JSONB);  -- the end
          EXCEPTION WHEN OTHERS THEN
            NULL;
          END;
          IF {GONE.format(s='e_state')} AND v_dead IS NULL THEN
            -- a connection error: ours to this rank (it went away), or one the rank raised (a peer of its went away)
            BEGIN
              PERFORM * FROM dblink({CONN.format(r='p_ranks[i]')}, 'SELECT 1') AS x(v INT);
            EXCEPTION WHEN OTHERS THEN
              GET STACKED DIAGNOSTICS v_dstate = RETURNED_SQLSTATE;
              -- not even this answered (a live rank in a failed transaction says so): report it, others follow
              IF v_dstate <> '25P02' THEN  -- in_failed_sql_transaction
                v_dead := p_ranks[i]; v_dmsg := e_msg; v_ddetail := e_detail; v_dstate := e_state;
              END IF;
            END;
          END IF;
        END LOOP;
        IF v_dead IS NOT NULL THEN
          PERFORM llm_dp_raise(p_cluster, v_dead, TRUE, v_dmsg, v_ddetail, NULL, v_dstate);
        END IF;
        IF v_bad IS NOT NULL THEN
          PERFORM llm_dp_raise(p_cluster, v_bad, FALSE, v_msg, v_detail, v_hint, v_state);
        END IF;
        RETURN v_out;
    """)
    out.append(function("llm_dp_gather", "p_cluster TEXT, p_ranks INT[], p_sqls TEXT[]", "JSONB[]", body, note="""
        Send p_sqls[i] (a query of one JSONB column) to rank p_ranks[i], all at once, wait for all of them, and
        return each one's first row; once every rank has answered, a rank whose connection failed is reported
        (llm_dp_raise), else the first rank that raised, with its message, HINT and SQLSTATE."""))
    body = plpgsql("", f"""
        IF p_gone THEN
          PERFORM llm_reraise(format('pg_llm: rank %s of cluster "%s" went away in the middle of a step: %s', p_rank,
                                     p_cluster, p_msg), p_detail, {GONE_HINT}, p_state);
        END IF;
        PERFORM llm_reraise(p_msg, concat_ws(' ', nullif(p_detail, ''),
                            format('(raised on rank %s of cluster "%s")', p_rank, p_cluster)), p_hint, p_state);
    """)
    out.append(function("llm_dp_raise", "p_cluster TEXT, p_rank INT, p_gone BOOLEAN, p_msg TEXT, p_detail TEXT, "
                        "p_hint TEXT, p_state TEXT", "VOID", body, note="""
        Re-raise an error of rank p_rank: its own message, HINT and SQLSTATE with the rank in the DETAIL, or, when
        the rank's server went away (p_gone: a crash, a shutdown, the network), a pg_llm error that says what to
        do."""))
    body = plpgsql("v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT;", f"""
        BEGIN
          PERFORM dblink_exec({CONN.format(r='p_rank')}, p_sql);
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                  v_state = RETURNED_SQLSTATE;
          PERFORM llm_dp_raise(p_cluster, p_rank, {GONE.format(s='v_state')}, v_msg, v_detail, v_hint,
                               v_state);
        END;
    """)
    out.append(function("llm_dp_exec", "p_cluster TEXT, p_rank INT, p_sql TEXT", "VOID", body, note="""
        Run the command p_sql on rank p_rank's connection; its error re-raised as llm_dp_raise does."""))
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
