"""pg-llm db start|stop|url: the persistent dev cluster under .pg_llm/ with pg_llm in database `pg_llm`."""
from __future__ import annotations

import argparse

from pg_llm.harness import devdb


def _start(args: argparse.Namespace) -> int:
    dsn = devdb.start(recreate=args.recreate)
    print(dsn)
    return 0


def _stop(args: argparse.Namespace) -> int:
    print("stopped" if devdb.stop() else "not running")
    return 0


def _url(args: argparse.Namespace) -> int:
    print(devdb.url())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="start/stop the dev PostgreSQL cluster (.pg_llm/), print its URL",
                       description=__doc__)
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    s = dsub.add_parser("start", help="initdb on first use, start, install pg_llm, print the connection URL "
                        "(also written to .pg_llm/dsn)")
    s.add_argument("--recreate", action="store_true",
                   help="drop and recreate database pg_llm with the current install.sql (loses its data)")
    s.set_defaults(func=_start)
    dsub.add_parser("stop", help="stop the dev cluster").set_defaults(func=_stop)
    dsub.add_parser("url", help="print the dev database URL").set_defaults(func=_url)


def dsn_argument(p: argparse.ArgumentParser) -> None:
    """--dsn for commands that talk to a database; defaults to $PG_LLM_DSN, then the dev database."""
    p.add_argument("--dsn", default=None, help="PostgreSQL connection string (default: $PG_LLM_DSN, "
                   "else the dev database from `pg-llm db start`)")


def resolve_dsn(value: str | None) -> str:
    import os

    return value or os.environ.get("PG_LLM_DSN") or devdb.url()
