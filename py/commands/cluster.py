"""pg-llm cluster up|add|list|sync|train|down: a cluster of ranks registered on a coordinator database (the dev
database by default; docs/scaleout.md). `up --ranks N` makes N rank databases on the coordinator's own server
(one backend per rank: every core of one machine) with pg_llm installed and registers them; `add DSN`
registers a database anywhere (another machine) that already has pg_llm; `train MODEL --steps N` is CALL
llm_cluster_train_run (data-parallel training on the ranks, its NOTICE lines on stderr)."""
from __future__ import annotations

import argparse
import sys

import psycopg
from psycopg import sql

from pg_llm.commands.db import dsn_argument, resolve_dsn
from pg_llm.commands.run import STEP, TRAIN_ARGS, _named, _options

# llm_cluster_train_run's arguments: llm_train_run's but the evaluation (the loop does not evaluate yet)
CLUSTER_TRAIN_ARGS = {k: v for k, v in TRAIN_ARGS.items() if not k.startswith("eval_")}

EXTENSIONS = ("plproxy", "postgres_fdw")


def rank_dbname(coordinator: str, name: str, rank: int) -> str:
    """The database `up` makes for a rank: named after the coordinator's database and the cluster."""
    return f"{coordinator}_{name}_r{rank}"


def _coordinator(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    for ext in EXTENSIONS:
        conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
    return conn


def _ensure_rank_db(dsn: str, dbname: str, recreate: bool) -> str:
    """Create (or with recreate, re-create) a rank database on the coordinator's server with pg_llm installed;
    returns what happened."""
    from pg_llm.gen.build import build_id
    from pg_llm.harness.cluster import install_pg_llm

    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if exists and recreate:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))
            exists = None
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    rank_dsn = psycopg.conninfo.make_conninfo(dsn, dbname=dbname)
    with psycopg.connect(rank_dsn) as conn:
        installed = conn.execute("SELECT to_regprocedure('llm_build()') IS NOT NULL").fetchone()[0]
        build = conn.execute("SELECT llm_build()").fetchone()[0] if installed else None
    if not installed:
        install_pg_llm(rank_dsn)
        return "created"
    if build != build_id():
        print(f"pg-llm cluster: {dbname} has pg_llm build {build}, this checkout generates another: "
              "`pg-llm cluster up --recreate` reinstalls the rank databases", file=sys.stderr)
        return "stale"
    return "kept"


def _up(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn)
    if args.ranks < 1:
        raise ValueError("--ranks must be at least 1")
    with _coordinator(dsn) as conn:
        info = conn.info
        have = conn.execute("SELECT count(*) FROM llm_cluster_rank WHERE cluster = %s", (args.name,)).fetchone()[0]
        if have > args.ranks:
            raise ValueError(f"cluster {args.name} has {have} ranks, more than --ranks {args.ranks}: "
                             f"`pg-llm cluster down --name {args.name}` first")
        host = info.host if info.host and not info.host.startswith("/") else (info.hostaddr or info.host)
        for r in range(args.ranks):
            dbname = rank_dbname(info.dbname, args.name, r)
            state = _ensure_rank_db(dsn, dbname, args.recreate)
            rank = conn.execute("SELECT llm_cluster_add(%s, %s, %s, %s, %s)",
                                (args.name, host, info.port, dbname, info.user)).fetchone()[0]
            print(f"rank {rank}: {dbname} ({state})")
    return 0


def _add(args: argparse.Namespace) -> int:
    params = psycopg.conninfo.conninfo_to_dict(args.rank_dsn)
    if not params.get("dbname"):
        raise ValueError("the rank's DSN needs a database name (dbname=... or postgresql://host:port/DBNAME)")
    port = int(params["port"]) if params.get("port") else 5432
    with _coordinator(resolve_dsn(args.dsn)) as conn:
        rank = conn.execute("SELECT llm_cluster_add(%s, %s, %s, %s, %s, %s)",
                            (args.name, params.get("host"), port, params["dbname"], params.get("user"),
                             params.get("password"))).fetchone()[0]
    print(f"rank {rank}")
    return 0


def _print(cur: psycopg.Cursor) -> None:
    rows = cur.fetchall()
    names = [c.name for c in cur.description or []]
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    print(" | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _list(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        _print(conn.execute("SELECT cluster, rank, conninfo, \"user\", added_at FROM llm_cluster_ranks "
                            "WHERE %s::TEXT IS NULL OR cluster = %s ORDER BY cluster, rank", (args.name, args.name)))
    return 0


def _sync(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        _print(conn.execute("SELECT * FROM llm_cluster_sync(%s, %s)", (args.model, args.name)))
    return 0


def _train(args: argparse.Namespace) -> int:
    named, params = _named({k: getattr(args, k) for k in CLUSTER_TRAIN_ARGS})
    last: list[str] = []

    def on_notice(d: psycopg.errors.Diagnostic) -> None:
        msg = d.message_primary or ""
        print(msg, file=sys.stderr)
        if STEP.match(msg):
            last[:] = [msg]

    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        conn.add_notice_handler(on_notice)
        conn.execute(sql.SQL("CALL llm_cluster_train_run(%s, %s, %s{})").format(named),
                     [args.name, args.model, args.steps, *params])
    print(last[0] if last else f"cluster {args.name}: model {args.model} has made {args.steps} steps already")
    return 0


def _down(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ours = [d for (d,) in conn.execute(
            "SELECT r.dbname FROM llm_cluster_ranks AS r WHERE r.cluster = %s AND r.dbname = %s || '_' || r.cluster "
            "|| '_r' || r.rank AND r.port = %s::INT", (args.name, conn.info.dbname, conn.info.port))]
        n = conn.execute("SELECT llm_cluster_drop(%s, if_exists => TRUE)", (args.name,)).fetchone()[0]
    if not args.keep_databases and ours:
        with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, dbname="postgres"), autocommit=True) as conn:
            for d in ours:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(d)))
    print(f"cluster {args.name}: {n} rank(s) unregistered" + (f", {len(ours)} database(s) dropped"
                                                              if ours and not args.keep_databases else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="a cluster of ranks (databases with pg_llm) on a coordinator: up, add, list, "
                       "sync, train, down", description=__doc__)
    csub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    def action(name: str, help: str, default: str | None = "local") -> argparse.ArgumentParser:
        a = csub.add_parser(name, help=help, description=help)
        dsn_argument(a)
        a.add_argument("--name", default=default, help=f"the cluster's name (default: {default or 'every cluster'})")
        return a

    u = action("up", "create N rank databases on the coordinator's server (named <database>_<name>_r<i>), install "
               "pg_llm in them and register them; idempotent (existing ranks are kept)")
    u.add_argument("--ranks", type=int, required=True, help="how many ranks")
    u.add_argument("--recreate", action="store_true", help="drop and re-create the rank databases (reinstalls "
                   "pg_llm; their models are lost)")
    u.set_defaults(func=_up)
    a = action("add", "register a database that has pg_llm (on any server) as the next rank")
    a.add_argument("rank_dsn", metavar="DSN", help="the rank's libpq conninfo or URL (host, port, dbname, user, "
                   "password)")
    a.set_defaults(func=_add)
    ls = action("list", "list the registered ranks (every cluster unless --name is given)", default=None)
    ls.set_defaults(func=_list)
    s = action("sync", "replicate MODEL (config, parameters, AdamW moments, step) to every rank and verify checksums")
    s.add_argument("model", metavar="MODEL", help="the coordinator's model")
    s.set_defaults(func=_sync)
    t = action("train", "CALL llm_cluster_train_run: train MODEL on the ranks up to --steps steps in all (resumes "
               "at the ranks' step; options left out keep the run's schedule, else llm_train_step's defaults)")
    t.add_argument("model", metavar="MODEL", help="the model the ranks hold (llm_cluster_sync put it there)")
    t.add_argument("--steps", type=int, required=True, help="train up to this many steps in total")
    _options(t, CLUSTER_TRAIN_ARGS)
    t.set_defaults(func=_train)
    d = action("down", "unregister the cluster; the databases `up` made for it are dropped")
    d.add_argument("--keep-databases", action="store_true", help="keep the rank databases `up` made")
    d.set_defaults(func=_down)
