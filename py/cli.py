"""pg-llm: one command line for pg_llm. Subcommands live in pg_llm.commands.<name> modules, each with
register(subparsers) adding its parser and setting `func` (returns an exit code)."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pg_llm import commands


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pg-llm", description="GPT-2 trained, evaluated and sampled from SQL "
                                 "inside PostgreSQL. Every subcommand has --help.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"pg_llm.commands.{info.name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line error for users; tracebacks with PG_LLM_DEBUG=1
        import os

        if os.environ.get("PG_LLM_DEBUG"):
            raise
        print(f"pg-llm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
