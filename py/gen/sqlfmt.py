"""Every generated SQL statement goes through here: sqlglot parses it (postgres dialect), we refuse what
sqlglot cannot understand, and we emit its pretty-printed form. Pretty output is re-parsed to prove it is a
fixed point, so `make generate` is deterministic and the committed SQL is exactly what sqlglot accepts."""
from __future__ import annotations

import logging
import textwrap

import sqlglot
from sqlglot import exp

DIALECT = "postgres"
logging.getLogger("sqlglot").setLevel(logging.ERROR)  # we report unsupported syntax ourselves


class SqlGenError(ValueError):
    pass


def _pretty(e: exp.Expression) -> str:
    return e.sql(dialect=DIALECT, pretty=True, normalize_functions=False)


def sql(text: str, indent: int = 0) -> str:
    """Parse-check and pretty-print one SQL statement (no trailing semicolon)."""
    try:
        tree = sqlglot.parse_one(text, read=DIALECT)
    except sqlglot.errors.ParseError as e:
        raise SqlGenError(f"sqlglot cannot parse generated SQL:\n{text}\n{e}") from e
    if isinstance(tree, exp.Command):
        raise SqlGenError(f"sqlglot does not understand this statement (use raw_ddl):\n{text}")
    out = _pretty(tree)
    again = _pretty(sqlglot.parse_one(out, read=DIALECT))
    if again != out:
        raise SqlGenError(f"pretty-printed SQL is not a fixed point:\n{out}\n---\n{again}")
    return textwrap.indent(out, " " * indent)


def raw_ddl(text: str) -> str:
    """A statement sqlglot only tokenizes (ALTER ... SET STORAGE, COMMENT ON, ...): must still tokenize."""
    sqlglot.tokenize(text, read=DIALECT)
    return " ".join(text.split())


def check_function_header(header: str) -> None:
    """Parse-check a CREATE FUNCTION header with a placeholder body (sqlglot mangles dollar-quoted bodies)."""
    try:
        tree = sqlglot.parse_one(header + " AS 'body'", read=DIALECT)
    except sqlglot.errors.ParseError as e:
        raise SqlGenError(f"sqlglot cannot parse function header:\n{header}\n{e}") from e
    if not isinstance(tree, exp.Create):
        raise SqlGenError(f"not a CREATE FUNCTION header:\n{header}")
