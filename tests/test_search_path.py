"""A hostile role's own schema shadows nothing of pg_llm's: every pg_llm function runs with a pinned search_path.

The role creates, in its own schema, a same-named copy of every pg_llm function and procedure (each raising,
except a server-file check that silently allows), of every pg_llm table and view (empty), and int/float/text
operators that lie; it then puts its schema before pg_catalog and calls the API. Results must be bit-identical
to the superuser's, and server files must stay out of reach."""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pg_llm.loader.tokenizer import ensure_gpt2

from gpt2_fixtures import import_tiny
from train_fixtures import same, snapshot, synthetic_dataset

STEP = "dataset => 'ds', batch_size => 2, lr => 1e-3, warmup_steps => 1, max_steps => 4, dropout => 0.1, seed => 3"

SHADOW = """
DO $do$
DECLARE
  f RECORD;
  v_body TEXT;
  v_made INT := 0;
BEGIN
  FOR f IN SELECT p.oid, p.proname, p.prokind, pg_get_function_arguments(p.oid) AS args,
                  pg_get_function_identity_arguments(p.oid) AS ids, pg_get_function_result(p.oid) AS res
           FROM pg_proc AS p WHERE p.pronamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace)
             AND (p.proname LIKE 'llm%' OR p.proname LIKE 'pg_llm%') AND p.prokind IN ('f', 'p') LOOP
    v_body := CASE WHEN f.proname = 'llm_server_file_check' THEN 'BEGIN END'  -- the attack: allow everything
                   ELSE format('BEGIN RAISE EXCEPTION %L; END', 'shadowed: ' || f.proname) END;
    BEGIN
      IF f.prokind = 'p' THEN
        EXECUTE format('CREATE PROCEDURE %I.%I(%s) LANGUAGE plpgsql AS %L', current_user, f.proname, f.args,
                       v_body);
      ELSE
        EXECUTE format('CREATE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE plpgsql AS %L', current_user, f.proname,
                       f.args, f.res, v_body);
      END IF;
      v_made := v_made + 1;
    EXCEPTION WHEN OTHERS THEN  -- e.g. an argument named like a result column: the identity form then
      EXECUTE format('CREATE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE plpgsql AS %L', current_user, f.proname,
                     f.ids, f.res, v_body);
      v_made := v_made + 1;
    END;
  END LOOP;
  FOR f IN SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS ids,
                  format_type(a.aggtranstype, NULL) AS st
           FROM pg_proc AS p JOIN pg_aggregate AS a ON a.aggfnoid = p.oid
           WHERE p.pronamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace) AND p.proname LIKE 'llm%' LOOP
    EXECUTE format('CREATE FUNCTION %I.%I(%s, %s) RETURNS %s LANGUAGE plpgsql AS %L', current_user,
                   f.proname || '_sfunc', f.st, f.ids, f.st, format('BEGIN RAISE EXCEPTION %L; END', f.proname));
    EXECUTE format('CREATE AGGREGATE %I.%I(%s) (SFUNC = %I.%I, STYPE = %s)', current_user, f.proname, f.ids,
                   current_user, f.proname || '_sfunc', f.st);
    v_made := v_made + 1;
  END LOOP;
  FOR f IN SELECT c.oid, c.relname FROM pg_class AS c
           WHERE c.relnamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace)
             AND c.relname LIKE 'llm%' AND c.relkind IN ('r', 'p', 'v') AND has_table_privilege(c.oid, 'SELECT') LOOP
    EXECUTE format('CREATE TABLE %I.%I (LIKE %s)', current_user, f.relname, f.oid::regclass);
  END LOOP;
  RAISE NOTICE 'shadowed % routines', v_made;
END
$do$;
"""

OPERATORS = [("+", "int4", "int4", "int4", "7"), ("-", "int4", "int4", "int4", "7"),
             ("*", "int4", "int4", "int4", "7"),
             ("+", "int8", "int8", "int8", "7"), ("*", "float8", "float8", "float8", "7"),
             ("/", "float8", "float8", "float8", "7"), ("=", "text", "text", "boolean", "false"),
             ("=", "int4", "int4", "boolean", "false"), ("<", "int4", "int4", "boolean", "true"),
             ("||", "text", "text", "text", "'x'")]


@pytest.fixture(scope="module")
def hostile(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A non-superuser with table grants (what inference and training need) and a schema full of shadows."""
    ensure_gpt2(conn)
    tmp = tmp_path_factory.mktemp("hostile")
    for name in ("mine", "theirs"):
        import_tiny(conn, tmp, name)
    synthetic_dataset(conn, "ds")
    role = f"alice_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} NOSUPERUSER IN ROLE llm_trainer")  # what training needs
    conn.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    conn.execute("SELECT llm_model_grant('theirs', %s)", (role,))
    conn.execute(f"SET ROLE {role}")
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute(SHADOW)
    routines = conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace IN ('public'::regnamespace, "
                            "'llm_internal'::regnamespace) AND (proname LIKE 'llm%' OR proname LIKE 'pg_llm%')"
                            ).fetchone()[0]
    assert f"shadowed {routines} routines" in notices, notices
    for i, (op, left, right, ret, value) in enumerate(OPERATORS):
        conn.execute(f"CREATE FUNCTION {role}.lie{i}({left}, {right}) RETURNS {ret} LANGUAGE sql "
                     f"AS $$SELECT {value}$$")
        conn.execute(f"CREATE OPERATOR {role}.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {role}.lie{i})")
    conn.execute("RESET ROLE")
    yield role
    conn.execute("RESET ROLE")
    conn.execute("RESET search_path")
    conn.execute(f"DROP OWNED BY {role}")
    conn.execute(f"DROP ROLE {role}")


def as_hostile(conn: psycopg.Connection, role: str) -> None:
    conn.execute(f"SET ROLE {role}")
    conn.execute(f"SET search_path = {role}, public, pg_catalog")  # pg_catalog last: its operators lose
    assert conn.execute("SELECT 2 + 2").fetchone()[0] == 7  # the caller's own queries do see the lies


def back(conn: psycopg.Connection) -> None:
    conn.execute("RESET ROLE")
    conn.execute("RESET search_path")


def test_every_function_pins_search_path(conn: psycopg.Connection) -> None:
    rows = conn.execute("""
        SELECT p.proname, p.prokind, p.proconfig, p.prosrc FROM pg_proc AS p
        WHERE p.pronamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace)
          AND (p.proname LIKE 'llm%' OR p.proname LIKE 'pg_llm%')
    """).fetchall()
    assert len(rows) > 150
    for name, kind, config, src in rows:
        if kind == "a":  # an aggregate has no body: its transition function (one of these) is checked
            continue
        if kind == "p":  # a procedure that COMMITs cannot have SET: it pins at the start and after each COMMIT
            assert src.count("set_config('search_path', 'pg_catalog, public, llm_internal, pg_temp', TRUE)") == \
                1 + src.count("COMMIT;"), name
        elif config is None:  # inlinable SQL (a SET clause forbids inlining): every operator schema-qualified
            bare = re.sub(r"OPERATOR\(pg_catalog\.[^)]+\)|pg_catalog\.\w+\(|\b(CAST|COALESCE|GREATEST|LEAST)\(",
                          "", src)
            assert "OPERATOR(pg_catalog." in src and not re.search(r"[-+*/<>=|%]|\w\(", bare), (name, bare)
        else:
            assert "search_path=pg_catalog, public, llm_internal, pg_temp" in (config or []), (name, config)


def test_hostile_schema_changes_no_result(conn: psycopg.Connection, hostile: str) -> None:
    # pg_llm's API called by its schema-qualified name (the role's own copies would win otherwise: its choice)
    queries = ["SELECT public.llm_encode('Hello world, shadows!')", "SELECT public.llm_decode('{15496,995}')",
               "SELECT public.llm_logits('mine', '{1,2,3,250}')",
               "SELECT * FROM public.llm_logits_all('mine', '{5,6}')",
               "SELECT public.llm_loss('mine', '{1,2,3}', '{2,3,4}')",
               "SELECT public.llm_generate_tokens('mine', '{1,2}', max_new_tokens => 4)",
               "SELECT public.llm_generate_tokens('mine', '{1,2}', max_new_tokens => 4, temperature => 0.9, "
               "seed => 5)",
               "SELECT * FROM public.llm_perplexity_tokens('mine', '{1,2,3,4,5,6,7}')",
               "SELECT public.llm_lr_at(5, 1e-3, 10, 100), public.llm_lr_at(50, 1e-3, 10, 100)",
               "SELECT name, shape, l2_norm FROM public.llm_tensors ORDER BY id"]
    expected = [conn.execute(q).fetchall() for q in queries]
    as_hostile(conn, hostile)
    try:
        got = [conn.execute(q).fetchall() for q in queries]
    finally:
        back(conn)
    for q, e, g in zip(queries, expected, got, strict=True):
        assert g == e, q


def test_hostile_schema_changes_no_training_step(conn: psycopg.Connection, hostile: str) -> None:
    """The SELECT step and the CALL loop (a procedure: it cannot pin with SET) train exactly as the owner's."""
    conn.execute("SELECT public.llm_train_step('mine', " + STEP + ")")
    conn.execute("CALL public.llm_train_run('mine', 2, " + STEP + ")")
    as_hostile(conn, hostile)
    try:
        conn.execute("SELECT public.llm_train_step('theirs', " + STEP + ")")
        conn.execute("CALL public.llm_train_run('theirs', 2, " + STEP + ")")  # no loopback (dblink_connect_u)
    finally:
        back(conn)
    assert same(snapshot(conn, "mine"), snapshot(conn, "theirs"))
    losses = conn.execute("SELECT model, array_agg(loss ORDER BY step) FROM llm_train_log GROUP BY model "
                          "ORDER BY model").fetchall()
    assert losses[0][1] == losses[1][1] and len(losses[0][1]) == 2, losses


def test_shadowed_file_check_still_refuses(conn: psycopg.Connection, tmp_path: Path, shared_dir: Path) -> None:
    """The reported hole, as reported: a role's own llm_server_file_check (and nothing else) in its schema, on
    the default search_path, let it overwrite and read the server's files."""
    target = shared_dir / "server-writable.npz"
    np.savez(target, x=np.zeros(3, np.float32))
    target.chmod(0o666)
    before = target.read_bytes()
    import_tiny(conn, tmp_path, "victim")
    conn.execute("SELECT llm_model_create('stolen', (SELECT config FROM llm_model WHERE name = 'victim'))")
    role = f"mallory_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} NOSUPERUSER IN ROLE llm_trainer")
    conn.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    conn.execute("SELECT llm_model_grant('stolen', %s)", (role,))
    conn.execute(f"SET ROLE {role}")
    try:
        conn.execute(f"CREATE FUNCTION {role}.llm_server_file_check(text, boolean, text) RETURNS void "
                     "LANGUAGE sql AS $$ SELECT $$")
        for sql in ("SELECT pg_llm_export_npz(%s, 'victim')", "SELECT pg_llm_import_npz(%s, 'stolen')",
                    "SELECT llm_internal.llm_npz_export(%s, 'victim', FALSE)",
                    "SELECT llm_internal.llm_npz_import(%s, 'stolen')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied to (read|write) the "
                               "server file"):
                conn.execute(sql, (str(target),))
    finally:
        conn.execute("RESET ROLE")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
    assert target.read_bytes() == before
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE model = 'stolen'").fetchone()[0] == 0


@pytest.mark.parametrize("name", ["qa dbname=postgres", "qa user", "it's", "back\\slash"])
def test_loopback_conninfo_quotes_role_names(conn: psycopg.Connection, name: str) -> None:
    """Role and database names are conninfo values, never extra keywords (a role 'qa dbname=postgres' used to
    send the loopback connection to database postgres)."""
    quoted = conn.execute("SELECT llm_internal.llm_conninfo_quote(%s)", (name,)).fetchone()[0]
    parsed = psycopg.conninfo.conninfo_to_dict(f"user={quoted} dbname=x")
    assert parsed == {"user": name, "dbname": "x"}
    role = '"' + name.replace('"', '""') + '"'
    conn.execute(f"CREATE ROLE {role} SUPERUSER LOGIN")  # dblink_connect_u: superusers only by default
    try:
        conn.execute(f"SET ROLE {role}")
        conn.execute("SELECT llm_internal.llm_loopback_connect('q')")
        remote = conn.execute("SELECT * FROM dblink('q', 'SELECT current_database(), current_user, "
                              "current_setting(''search_path'')') AS x(db TEXT, u TEXT, p TEXT)").fetchone()
        conn.execute("SELECT llm_internal.llm_loopback_close('q')")
    finally:
        conn.execute("RESET ROLE")
        conn.execute(f"DROP ROLE {role}")
    assert remote == (conn.info.dbname, name, "pg_catalog, public, llm_internal, pg_temp")
