"""The packaged engines scale-out builds on, working on this machine as make setup installs them: PL/Proxy
(postgresql-15-plproxy: a cluster from SQL/MED, RUN ON ALL fan-out, RUN ON hash routing) over two rank
databases of the test server, and postgres_fdw with two-phase commit (PREPARE TRANSACTION) reaching a rank."""
from __future__ import annotations

import psycopg
from psycopg import sql

from conftest import Server

RANKS = ("t_rank_0", "t_rank_1")


def test_plproxy_fans_out_and_routes(server: Server) -> None:
    coord = server.fresh_db("t_coordinator")
    info = psycopg.conninfo.conninfo_to_dict(server.admin_dsn)
    for r in RANKS:
        with psycopg.connect(server.fresh_db(r), autocommit=True) as c:
            c.execute("CREATE FUNCTION rank_name(key TEXT) RETURNS TEXT LANGUAGE sql AS "
                      "$$ SELECT current_database() || ':' || key $$")
    with psycopg.connect(coord, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION plproxy")
        dsns = [f"host={info.get('host', '127.0.0.1')} port={info['port']} dbname={r}" for r in RANKS]
        parts = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(f"p{i}"), sql.Literal(d))
                                   for i, d in enumerate(dsns))
        conn.execute(sql.SQL("CREATE SERVER ranks FOREIGN DATA WRAPPER plproxy OPTIONS ({})").format(parts))
        conn.execute(sql.SQL("CREATE USER MAPPING FOR PUBLIC SERVER ranks OPTIONS (user {})").format(
            sql.Literal(info["user"])))
        conn.execute("CREATE FUNCTION rank_name(key TEXT) RETURNS SETOF TEXT LANGUAGE plproxy AS "
                     "$$ CLUSTER 'ranks'; RUN ON ALL; $$")
        conn.execute("CREATE FUNCTION rank_of(key TEXT) RETURNS TEXT LANGUAGE plproxy AS "
                     "$$ CLUSTER 'ranks'; RUN ON hashtext(key); SELECT rank_name(key); $$")
        everywhere = sorted(r for (r,) in conn.execute("SELECT rank_name('k')"))
        assert everywhere == [f"{r}:k" for r in RANKS]
        routed = {k: conn.execute("SELECT rank_of(%s)", (k,)).fetchone()[0] for k in map(str, range(16))}
        assert {v.split(":")[0] for v in routed.values()} == set(RANKS)  # both ranks get keys
        assert routed == {k: conn.execute("SELECT rank_of(%s)", (k,)).fetchone()[0] for k in routed}  # stable


def test_postgres_fdw_two_phase_commit(server: Server) -> None:
    rank = server.fresh_db("t_rank_fdw")
    with psycopg.connect(rank, autocommit=True) as c:
        c.execute("CREATE TABLE tiles (id INT PRIMARY KEY, data BYTEA)")
        prepared = c.execute("SELECT setting::INT FROM pg_settings WHERE name = 'max_prepared_transactions'"
                             ).fetchone()[0]
    assert prepared > 0, "the harness must enable max_prepared_transactions for atomic steps across ranks"
    info = psycopg.conninfo.conninfo_to_dict(server.admin_dsn)
    with psycopg.connect(server.fresh_db("t_coord_fdw"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION postgres_fdw")
        conn.execute(sql.SQL("CREATE SERVER r0 FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host {}, port {}, "
                             "dbname 't_rank_fdw')").format(sql.Literal(info.get("host", "127.0.0.1")),
                                                            sql.Literal(str(info["port"]))))
        conn.execute(sql.SQL("CREATE USER MAPPING FOR CURRENT_USER SERVER r0 OPTIONS (user {})").format(
            sql.Literal(info["user"])))
        conn.execute("IMPORT FOREIGN SCHEMA public LIMIT TO (tiles) FROM SERVER r0 INTO public")
        conn.execute("INSERT INTO tiles VALUES (1, '\\x01')")
        assert conn.execute("SELECT count(*) FROM tiles").fetchone()[0] == 1
    with psycopg.connect(rank, autocommit=True) as c:  # a step's write on a rank, prepared, then committed
        c.execute("BEGIN")
        c.execute("INSERT INTO tiles VALUES (2, '\\x02')")
        c.execute("PREPARE TRANSACTION 'pg_llm_test_step'")
        assert c.execute("SELECT count(*) FROM tiles").fetchone()[0] == 1
        c.execute("COMMIT PREPARED 'pg_llm_test_step'")
        assert c.execute("SELECT count(*) FROM tiles").fetchone()[0] == 2
        assert c.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()[0] == 0
