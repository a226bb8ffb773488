"""A cluster of ranks (py/api/cluster.py, docs/scaleout.md) over databases of the test server: registration
(PL/Proxy SQL/MED server with modular_mapping, postgres_fdw servers), llm_cluster_sync of a tiny model with
AdamW moments to 2 and 3 ranks (byte-identical tiles, checksums equal to the coordinator's), llm_cluster_check
refusing a diverging parameter, another config or another build, bad input refused before anything is
written, quoting of names and passwords, privileges, and the pg-llm cluster commands."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conftest import Server
from helpers import made_roles
from train_fixtures import synthetic_dataset

CLI = str(Path(sys.executable).parent / "pg-llm")
RANKS = ("t_cl_r0", "t_cl_r1", "t_cl_r2")
QUOTED = "t_cl_o'brien\\x"  # a quote and a backslash: conninfo and DDL quoting
PASSWORD = "pa'ss\\word x"
TILES = """SELECT v.name, v.role, v.shape, v.tile, t.tr, t.tc, t.data FROM llm_tensor AS v
           JOIN llm_tile AS t ON t.tensor_id = v.id
           WHERE v.model = %s AND v.id > 0 ORDER BY v.name, v.role, t.tr, t.tc"""


def coordinator_db(server: Server, name: str) -> str:
    """A fresh coordinator database: plproxy, postgres_fdw and model 'tiny' (1 layer, vocab 301: ragged tiles)
    at step 0."""
    dsn = server.fresh_db(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION plproxy")
        conn.execute("CREATE EXTENSION postgres_fdw")
        conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) "
                     "VALUES ('tiny', 1, 2, 32, 16, 301)")
        conn.execute("SELECT llm_model_init('tiny', 'tiny', seed => 1)")
    return dsn


@pytest.fixture(scope="module")
def coord(server: Server) -> Iterator[psycopg.Connection]:
    """The coordinator: plproxy, postgres_fdw and model 'tiny' (1 layer, vocab 301: ragged tiles) after one
    AdamW step (parameters and both moments)."""
    with psycopg.connect(coordinator_db(server, "t_cl_coord"), autocommit=True) as conn:
        synthetic_dataset(conn, "ds")
        conn.execute("SELECT llm_train_step('tiny', dataset => 'ds', batch_size => 2, lr => 1e-2, warmup_steps => 1,"
                     " max_steps => 4, seed => 3)")
        yield conn


@pytest.fixture(scope="module")
def ranks(server: Server) -> dict[str, str]:
    return {name: server.fresh_db(name) for name in (*RANKS, QUOTED)}


def where(server: Server) -> tuple[str, int, str]:
    info = psycopg.conninfo.conninfo_to_dict(server.admin_dsn)
    return info.get("host", "127.0.0.1"), int(info["port"]), info["user"]


def add(conn: psycopg.Connection, server: Server, cluster: str, dbname: str, password: str | None = None) -> int:
    host, port, user = where(server)
    return conn.execute("SELECT llm_cluster_add(%s, %s, %s, %s, %s, %s)",
                        (cluster, host, port, dbname, user, password)).fetchone()[0]


def tiles(dsn: str, model: str = "tiny") -> list[tuple]:
    with psycopg.connect(dsn) as c:
        return c.execute(TILES, (model,)).fetchall()


def state(dsn: str) -> tuple:
    """What a write to a rank would change: its catalog, tiles (with row versions) and models."""
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT (SELECT array_agg((id, model, name, role, shape) ORDER BY id) FROM llm_tensor), "
                         "(SELECT array_agg((tensor_id, tr, tc, xmin::TEXT) ORDER BY 1, 2, 3) FROM llm_tile), "
                         "(SELECT array_agg((name, config, step) ORDER BY name) FROM llm_model)").fetchone()


def coordinator_sum(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT checksum FROM llm_internal.llm_cluster_model_sum('tiny')").fetchone()[0]


def test_plproxy_partition_counts(coord: psycopg.Connection) -> None:
    """PL/Proxy's validator refuses 3 partitions (hash & (n - 1) needs a power of two) unless modular_mapping;
    why every pg_llm cluster is defined with it."""
    with pytest.raises(psycopg.Error, match="power of 2"):
        coord.execute("CREATE SERVER t_pow FOREIGN DATA WRAPPER plproxy OPTIONS (p0 'dbname=a', p1 'dbname=b', "
                      "p2 'dbname=c')")
    coord.execute("CREATE SERVER t_mod FOREIGN DATA WRAPPER plproxy OPTIONS (modular_mapping '1', p0 'dbname=a', "
                  "p1 'dbname=b', p2 'dbname=c')")
    coord.execute("DROP SERVER t_mod")


def test_sync_to_two_ranks(coord: psycopg.Connection, ranks: dict[str, str], server: Server) -> None:
    assert [add(coord, server, "two", r) for r in RANKS[:2]] == [0, 1]
    assert add(coord, server, "two", RANKS[1]) == 1  # registered already: the same rank
    rows = coord.execute("SELECT rank, tensors, bytes, checksum, seconds FROM llm_cluster_sync('tiny', 'two')"
                         ).fetchall()
    want = tiles(coord.info.dsn)
    n_tensors = coord.execute("SELECT count(*) FROM llm_tensor WHERE model = 'tiny' AND id > 0").fetchone()[0]
    assert {r[1] for r in want} == {"param", "adam_m", "adam_v"}
    assert [r[0] for r in rows] == [0, 1]
    for _, tensors, nbytes, checksum, seconds in rows:
        assert (tensors, nbytes, checksum) == (n_tensors, sum(len(t[6]) for t in want), coordinator_sum(coord))
        assert seconds >= 0
    for r in RANKS[:2]:
        assert tiles(ranks[r]) == want  # byte-identical parameters and moments, tile by tile
        with psycopg.connect(ranks[r]) as c:
            assert c.execute("SELECT config, step FROM llm_model WHERE name = 'tiny'").fetchone() == ("tiny", 1)
    checked = coord.execute("SELECT rank, step, checksum FROM llm_cluster_check('two', 'tiny')").fetchall()
    assert checked == [(0, 1, coordinator_sum(coord)), (1, 1, coordinator_sum(coord))]


def test_sync_to_three_ranks(coord: psycopg.Connection, ranks: dict[str, str], server: Server) -> None:
    """3 ranks (not a power of two): one partition each, each called once; ranks 0 and 1 already hold the model
    (from the 'two' cluster) and are updated in place after a second training step on the coordinator."""
    assert [add(coord, server, "three", r) for r in RANKS] == [0, 1, 2]
    opts = coord.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'llm_cluster_three'").fetchone()[0]
    assert sorted(o.split("=")[0] for o in opts) == ["modular_mapping", "p0", "p1", "p2"]
    answered = coord.execute("SELECT rank, dbname FROM llm_internal.llm_cluster_px_info('three', '{0,1,2}', NULL, "
                             "NULL, FALSE) ORDER BY rank").fetchall()
    assert answered == list(enumerate(RANKS))
    coord.execute("SELECT llm_train_step('tiny', dataset => 'ds', batch_size => 2, lr => 1e-2, warmup_steps => 1, "
                  "max_steps => 4, seed => 3)")
    rows = coord.execute("SELECT rank, checksum FROM llm_cluster_sync('tiny', 'three')").fetchall()
    assert rows == [(r, coordinator_sum(coord)) for r in range(3)]
    want = tiles(coord.info.dsn)
    for r in RANKS:
        assert tiles(ranks[r]) == want
    assert [r[0] for r in coord.execute("SELECT * FROM llm_cluster_check('three', 'tiny')")] == [0, 1, 2]
    assert len(coord.execute("SELECT * FROM llm_cluster_check('two', 'tiny')").fetchall()) == 2  # the same dbs
    with psycopg.connect(ranks[RANKS[0]], autocommit=True) as c:
        c.execute("UPDATE llm_model SET step = 1 WHERE name = 'tiny'")
    with pytest.raises(psycopg.errors.RaiseException, match=r'model "tiny" is at step 1 on rank 0 of cluster "two" '
                       r'\(database "t_cl_r0"\), at step 2 on the coordinator'):
        coord.execute("SELECT * FROM llm_cluster_check('two', 'tiny')")
    coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'two')")


def test_check_refuses_a_diverging_parameter(coord: psycopg.Connection, ranks: dict[str, str]) -> None:
    with psycopg.connect(ranks[RANKS[1]], autocommit=True) as c:
        c.execute("UPDATE llm_tile SET data = overlay(data PLACING '\\x00000000'::BYTEA FROM 1) WHERE tensor_id = "
                  "llm_param('tiny', 'h.0.attn.c_proj.weight') AND tr = 0 AND tc = 0")
    with pytest.raises(psycopg.errors.RaiseException) as e:
        coord.execute("SELECT * FROM llm_cluster_check('three', 'tiny')")
    assert e.value.diag.message_primary == ('pg_llm: the parameters of model "tiny" diverge on rank 1 of cluster '
                                            '"three" (database "t_cl_r1") from the coordinator\'s: '
                                            'h.0.attn.c_proj.weight (param)')
    assert e.value.diag.message_hint == "SELECT * FROM llm_cluster_sync('tiny', 'three') replicates the " \
                                        "coordinator's model to every rank."
    coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'three')")
    assert len(coord.execute("SELECT * FROM llm_cluster_check('three', 'tiny')").fetchall()) == 3


def test_check_refuses_another_config(coord: psycopg.Connection, ranks: dict[str, str]) -> None:
    with psycopg.connect(ranks[RANKS[2]], autocommit=True) as c:
        c.execute("UPDATE llm_model_config SET dropout = 0.2 WHERE name = 'tiny'")
    with pytest.raises(psycopg.errors.RaiseException,
                       match=r'model "tiny" has another config on rank 2 of cluster "three" .*dropout 0.2 there, '
                             r'0.1 here'):
        coord.execute("SELECT * FROM llm_cluster_check('three', 'tiny')")
    coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'three')")  # the rank's config row is the coordinator's again
    with psycopg.connect(ranks[RANKS[2]]) as c:
        assert c.execute("SELECT dropout FROM llm_model_config WHERE name = 'tiny'").fetchone()[0] == 0.1
    assert len(coord.execute("SELECT * FROM llm_cluster_check('three', 'tiny')").fetchall()) == 3


def test_another_build_is_refused_before_anything_is_written(coord: psycopg.Connection,
                                                             ranks: dict[str, str]) -> None:
    coord.execute("SELECT llm_train_step('tiny', dataset => 'ds', batch_size => 2, lr => 1e-2, warmup_steps => 1, "
                  "max_steps => 4, seed => 3)")  # the coordinator moves on: a sync would write every rank
    with psycopg.connect(ranks[RANKS[2]], autocommit=True) as c:
        real = c.execute("SELECT llm_build()").fetchone()[0]
        c.execute("CREATE OR REPLACE FUNCTION llm_build() RETURNS TEXT LANGUAGE sql AS $$ SELECT 'other' $$")
    before = {r: state(ranks[r]) for r in RANKS}
    try:
        for q in ("SELECT * FROM llm_cluster_check('three', 'tiny')",
                  "SELECT * FROM llm_cluster_sync('tiny', 'three')"):
            with pytest.raises(psycopg.errors.RaiseException) as e:
                coord.execute(q)
            assert e.value.diag.message_primary == ('pg_llm: rank 2 of cluster "three" (database "t_cl_r2") runs '
                                                    f"pg_llm build other, the coordinator runs {real}")
            assert "Install the coordinator's pg_llm on the rank" in e.value.diag.message_hint
        assert {r: state(ranks[r]) for r in RANKS} == before
    finally:
        with psycopg.connect(ranks[RANKS[2]], autocommit=True) as c:
            c.execute(f"CREATE OR REPLACE FUNCTION llm_build() RETURNS TEXT LANGUAGE sql AS $$ SELECT '{real}' $$")
    coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'three')")


def test_bad_input_writes_nothing(coord: psycopg.Connection, ranks: dict[str, str], server: Server) -> None:
    before = {r: state(ranks[r]) for r in RANKS}
    for q, msg in [("SELECT * FROM llm_cluster_sync('tiny', 'nope')", 'unknown cluster "nope"'),
                   ("SELECT * FROM llm_cluster_sync('nope', 'three')", 'unknown model "nope"'),
                   ("SELECT * FROM llm_cluster_check('nope', 'tiny')", 'unknown cluster "nope"'),
                   ("SELECT llm_cluster_add('Bad-Name', 'h', 5432, 'd')", 'invalid cluster name "Bad-Name"'),
                   ("SELECT llm_cluster_drop('nope')", 'unknown cluster "nope"')]:
        with pytest.raises(psycopg.errors.RaiseException, match=msg):
            coord.execute(q)
    assert {r: state(ranks[r]) for r in RANKS} == before
    bare = server.fresh_db("t_cl_bare")  # a coordinator without the extensions
    with psycopg.connect(bare, autocommit=True) as c:
        for q in ("SELECT llm_cluster_add('c', 'h', 5432, 'd')", "SELECT * FROM llm_cluster_sync('m', 'c')"):
            with pytest.raises(psycopg.errors.RaiseException, match="needs the extension") as e:
                c.execute(q)
            assert e.value.diag.message_hint.startswith("CREATE EXTENSION plproxy; CREATE EXTENSION postgres_fdw;")
        assert c.execute("SELECT count(*) FROM llm_cluster_rank").fetchone()[0] == 0


def test_sync_refuses_what_a_rank_cannot_take(coord: psycopg.Connection, ranks: dict[str, str],
                                              server: Server) -> None:
    """Refused before any rank is written: a rank whose config of the same name differs and serves another model
    there, the coordinator's own database registered as a rank, a rank that does not answer."""
    with psycopg.connect(ranks[RANKS[1]], autocommit=True) as c:
        c.execute("UPDATE llm_model_config SET dropout = 0 WHERE name = 'tiny'")
        c.execute("INSERT INTO llm_model (name, config) VALUES ('other', 'tiny')")
    before = {r: state(ranks[r]) for r in RANKS}
    with pytest.raises(psycopg.errors.RaiseException, match=r'rank 1 of cluster "three" \(database "t_cl_r1"\): '
                       r'config "tiny" of this rank differs from the coordinator\'s and is used by model\(s\) other'):
        coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'three')")
    assert {r: state(ranks[r]) for r in RANKS} == before
    with psycopg.connect(ranks[RANKS[1]], autocommit=True) as c:
        c.execute("DELETE FROM llm_model WHERE name = 'other'")
    coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'three')")
    assert add(coord, server, "self", coord.info.dbname) == 0
    with pytest.raises(psycopg.errors.RaiseException, match="is the coordinator's own database"):
        coord.execute("SELECT * FROM llm_cluster_sync('tiny', 'self')")
    coord.execute("SELECT llm_cluster_drop('self')")
    with pytest.raises(psycopg.errors.RaiseException, match='rank 0 of cluster "gone" .* did not answer'):
        add(coord, server, "gone", "t_cl_no_such_database")
    assert coord.execute("SELECT count(*) FROM llm_cluster_rank WHERE cluster = 'gone'").fetchone()[0] == 0
    assert coord.execute("SELECT count(*) FROM pg_foreign_server WHERE srvname LIKE '%gone%'").fetchone()[0] == 0


def test_quoted_names_and_passwords(coord: psycopg.Connection, ranks: dict[str, str], server: Server) -> None:
    """A database named with a quote and a backslash, and such a password (ignored by trust authentication,
    but spliced into the user mappings and conninfo): the rank is reached, synced and checked."""
    assert add(coord, server, "quoted", QUOTED, PASSWORD) == 0
    mapping = coord.execute("SELECT umoptions FROM pg_user_mappings WHERE srvname = 'llm_cluster_quoted'").fetchone()
    assert f"password={PASSWORD}" in mapping[0]
    assert coord.execute("SELECT rank, checksum FROM llm_cluster_sync('tiny', 'quoted')").fetchall() == [
        (0, coordinator_sum(coord))]
    assert tiles(ranks[QUOTED]) == tiles(coord.info.dsn)
    assert coord.execute("SELECT dbname FROM llm_cluster_check('quoted', 'tiny')").fetchone()[0] == QUOTED
    with pytest.raises(psycopg.errors.RaiseException, match="one password"):
        add(coord, server, "quoted", RANKS[0], "another")
    assert coord.execute("SELECT llm_cluster_drop('quoted')").fetchone()[0] == 1
    assert coord.execute("SELECT count(*) FROM pg_foreign_server WHERE srvname LIKE 'llm_%quoted%'").fetchone()[0] == 0


def test_roles(coord: psycopg.Connection, ranks: dict[str, str]) -> None:
    """Internal helpers (the PL/Proxy functions made at registration too) are not PUBLIC's; registering ranks
    is for admins."""
    assert coord.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc AS p
        WHERE p.pronamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace) AND p.proname LIKE 'llm%'
          AND has_function_privilege('public', p.oid, 'EXECUTE')""").fetchall() == []
    with made_roles(coord, {"nobody": "", "trainer": "IN ROLE llm_trainer"}) as who:
        for q, match in [("SELECT llm_internal.llm_cluster_rank_info('{0}', 'tiny')", "permission denied for schema"),
                         ("SELECT llm_internal.llm_cluster_px_info('three', '{0}', 'tiny', NULL, FALSE)",
                          "permission denied for schema"),
                         ("SELECT llm_cluster_add('x', 'h', 1, 'd')", "permission denied for function"),
                         ("SELECT * FROM llm_cluster_sync('tiny', 'three')", "permission denied for function")]:
            coord.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(who["nobody"])))
            try:
                with pytest.raises(psycopg.Error, match=match):
                    coord.execute(q)
            finally:
                coord.execute("RESET ROLE")
        coord.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(who["trainer"])))
        try:
            with pytest.raises(psycopg.errors.RaiseException, match="registering ranks is for members of llm_admin"):
                coord.execute("SELECT llm_cluster_add('x', 'h', 1, 'd')")
            with pytest.raises(psycopg.Error, match="permission denied for table llm_cluster_rank"):
                coord.execute("DELETE FROM llm_cluster_rank")
        finally:
            coord.execute("RESET ROLE")


def test_cli(coord: psycopg.Connection) -> None:
    dsn = coord.info.dsn

    def run(*args: str) -> str:
        p = subprocess.run([CLI, "cluster", *args, "--dsn", dsn], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    assert "rank 1: t_cl_coord_cli_r1 (created)" in run("up", "--ranks", "2", "--name", "cli")
    assert "rank 1: t_cl_coord_cli_r1 (kept)" in run("up", "--ranks", "2", "--name", "cli")  # idempotent
    assert "t_cl_coord_cli_r0" in run("list", "--name", "cli")
    synced = run("sync", "tiny", "--name", "cli").splitlines()
    assert len(synced) == 4 and coordinator_sum(coord) in synced[2]
    assert "2 rank(s) unregistered, 2 database(s) dropped" in run("down", "--name", "cli")
    assert coord.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 't_cl_coord_cli%'").fetchone()[0] == 0
    for action in ("up", "add", "list", "sync", "down"):
        out = subprocess.run([CLI, "cluster", action, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--name" in out.stdout
