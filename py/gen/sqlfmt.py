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


# Operators PostgreSQL would look up through the caller's search_path, as OPERATOR(pg_catalog.x).
_OPERATORS = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.Mod: "%", exp.EQ: "=", exp.NEQ: "<>",
              exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">=", exp.DPipe: "||"}
# Grammar constructs that look nothing up (GREATEST/LEAST compare with the type's default btree opclass).
_SYNTAX = (exp.Case, exp.If, exp.Coalesce, exp.Greatest, exp.Least, exp.Cast, exp.Paren, exp.Literal, exp.Column,
           exp.Identifier, exp.Boolean, exp.Null, exp.DataType, exp.And, exp.Or, exp.Not, exp.Is, exp.Select,
           exp.Operator)
# Types spelled as keywords resolve to pg_catalog in the grammar itself; others would go through search_path.
_KEYWORD_TYPES = {"INT", "BIGINT", "SMALLINT", "DOUBLE PRECISION", "REAL", "BOOLEAN", "NUMERIC"}


def qualify_builtins(text: str) -> str:
    """One SELECT expression with every operator and function named by schema (pg_catalog), so that a SQL
    function can stay inlinable (no SET search_path) and still resolve nothing through its caller's path.
    Refuses what would resolve implicitly (IN, BETWEEN, NULLIF, simple CASE, unary minus, casts to
    non-keyword types, calls of pg_llm's own functions)."""
    tree = sqlglot.parse_one(text, read=DIALECT)

    def rewrite(node: exp.Expression) -> exp.Expression:
        if type(node) in _OPERATORS:  # parenthesized: OPERATOR() has one precedence for all operators
            return exp.Paren(this=exp.Operator(this=node.this, operator=f"pg_catalog.{_OPERATORS[type(node)]}",
                                               expression=node.expression))
        if isinstance(node, exp.Case) and node.this is not None or isinstance(node, exp.Neg) and not (
                isinstance(node.this, exp.Literal)):
            raise SqlGenError(f"inline SQL cannot qualify {node.sql(dialect=DIALECT)!r}")
        if isinstance(node, exp.DataType) and node.sql(dialect=DIALECT).upper() not in _KEYWORD_TYPES:
            raise SqlGenError(f"inline SQL: cast to a non-keyword type {node.sql(dialect=DIALECT)}")
        if isinstance(node, exp.Func) and not isinstance(node, _SYNTAX):
            name = node.sql_name() if not isinstance(node, exp.Anonymous) else node.name
            if name.lower().startswith("llm_"):
                raise SqlGenError(f"inline SQL cannot call pg_llm's {name}: use a pinned function")
            return exp.Dot(this=exp.to_identifier("pg_catalog"),
                           expression=exp.Anonymous(this=name.lower(), expressions=list(node.args.values())
                                                    if not isinstance(node, exp.Anonymous) else node.expressions))
        if not isinstance(node, (*_SYNTAX, exp.Neg, exp.Dot, exp.Anonymous)) and type(node) not in _OPERATORS:
            raise SqlGenError(f"inline SQL: {type(node).__name__} may resolve through search_path")
        return node

    def walk(node: exp.Expression) -> exp.Expression:  # children first: a rewritten node is not revisited
        for key, value in list(node.args.items()):
            if isinstance(value, exp.Expression):
                node.set(key, walk(value))
            elif isinstance(value, list):
                node.set(key, [walk(v) if isinstance(v, exp.Expression) else v for v in value])
        return rewrite(node)

    return _pretty(walk(tree))
