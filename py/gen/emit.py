"""Builders for the SQL objects the generator emits: commented statements, SQL/PL/pgSQL functions and
procedures, and PL/Python microkernels whose body imports a function of pg_llm.kernels (so the same code is
unit-tested offline and runs inside the server)."""
from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sequence

import sqlglot

from pg_llm.gen.sqlfmt import check_function_header, qualify_builtins, sql
from pg_llm.gen.surface import INTERNAL, PUBLIC, qualified


def comment(text: str) -> str:
    return "\n".join(("-- " + line).rstrip() for line in textwrap.dedent(text).strip().splitlines())


def stmt(text: str, note: str | None = None) -> str:
    """A top-level statement, parse-checked and pretty-printed, with an optional comment above it."""
    head = comment(note) + "\n" if note else ""
    return head + sql(text) + ";\n"


def sql_statements(text: str) -> str:
    """Parse-check and pretty-print a ';'-separated list of SQL statements (a LANGUAGE sql body)."""
    parts = [p for p in sqlglot.transpile(text, read="postgres", write="postgres", pretty=True,
                                          normalize_functions=False) if p.strip()]
    return ";\n".join(sql(p) for p in parts)


# Every function runs with this search_path, whoever calls it: pg_catalog first (no operator or function of
# the caller's can shadow a built-in), then pg_llm's own schema and its internals' (surface.INTERNAL), pg_temp
# last (never first, as it would be by default for tables). @extschema@ is pg_llm's schema: CREATE EXTENSION
# substitutes it, install.sql says public.
EXTSCHEMA = "@extschema@"
SEARCH_PATH = f"pg_catalog, {EXTSCHEMA}, {INTERNAL}, pg_temp"


def _check_header(parts: Sequence[str]) -> None:
    # sqlglot does not know PARALLEL SAFE nor the @extschema@ placeholder; check the rest of the header.
    check_function_header(" ".join(p for p in parts if not p.startswith("PARALLEL")).replace(EXTSCHEMA, "s"))


def _header(name: str, args: str, returns: str, language: str, volatility: str,
            settings: Sequence[str], strict: bool, parallel: str, pin: bool = True, definer: bool = False) -> str:
    parts = [f"CREATE OR REPLACE FUNCTION {qualified(name)}({args})", f"RETURNS {returns}", f"LANGUAGE {language}",
             volatility]
    if strict:
        parts.append("STRICT")
    if parallel:
        parts.append(f"PARALLEL {parallel}")
    if definer:  # runs as pg_llm's owner: only for a body whose result does not depend on who calls it
        parts.append("SECURITY DEFINER")
    parts += [f"SET search_path = {SEARCH_PATH}"] * pin + [f"SET {s}" for s in settings]
    _check_header(parts)
    return "\n".join(parts)


def function(name: str, args: str, returns: str, body: str, *, language: str = "plpgsql",
             volatility: str = "VOLATILE", note: str | None = None, settings: Sequence[str] = (),
             strict: bool = False, parallel: str = "", inline: bool = False, definer: bool = False) -> str:
    """CREATE OR REPLACE FUNCTION with a dollar-quoted body. SQL statements inside PL/pgSQL bodies are
    built with sqlfmt.sql() by the caller; the envelope is parse-checked here. inline: a one-expression SQL
    function the planner may inline (a SET clause would forbid it): no SET search_path, every operator and
    function in its body named by schema instead (qualify_builtins). definer: SECURITY DEFINER (with its
    pinned search_path), for the few bodies that write what the caller may not (py/api/privileges.py)."""
    if inline and (language != "sql" or settings):
        raise ValueError(f"{name}: only a SQL function without settings can be inlined")
    if definer and (inline or name in PUBLIC):
        raise ValueError(f"{name}: a SECURITY DEFINER function must be internal and pin its search_path")
    header = _header(name, args, returns, language, volatility, settings, strict, parallel, pin=not inline,
                     definer=definer)
    body = textwrap.dedent(body).strip("\n")
    if inline:
        body = qualify_builtins(body)
    elif language == "sql":  # SQL-language bodies are statements: parse-check and pretty-print each
        body = sql_statements(body)
    head = comment(note) + "\n" if note else ""
    return f"{head}{header}\nAS $fn$\n{body}\n$fn$;\n"


# A procedure that COMMITs cannot have a SET clause, so it pins search_path itself: set_config(..., TRUE)
# lasts until the end of the current transaction, hence once at the start and again after every COMMIT;
# the caller's own path is restored before the procedure returns.
_PIN = f"PERFORM pg_catalog.set_config('search_path', '{SEARCH_PATH}', TRUE);"
_COMMIT = re.compile(r"^(\s*)COMMIT;$", re.MULTILINE)


def procedure(name: str, args: str, declare: str, body: str, *, note: str, **queries: str) -> str:
    """CREATE PROCEDURE in PL/pgSQL whose statements run under SEARCH_PATH (see _PIN). DECLARE initializers
    would run before the pin: give variables their values in the body."""
    if ":=" in declare:
        raise ValueError(f"{name}: initialize variables in the body, after search_path is pinned")
    _check_header([f"CREATE OR REPLACE FUNCTION {name}({args})", "RETURNS VOID", "LANGUAGE plpgsql"])
    body = _COMMIT.sub(lambda m: f"{m.group(1)}COMMIT;\n{m.group(1)}{_PIN}", textwrap.dedent(body).strip("\n"))
    body = ("v_caller_path := pg_catalog.current_setting('search_path');\n" + _PIN + "\n" + body
            + "\nPERFORM pg_catalog.set_config('search_path', v_caller_path, TRUE);")
    block = plpgsql("v_caller_path TEXT;\n" + textwrap.dedent(declare).strip(), body, **queries)
    head = comment(note) + "\n"
    return f"{head}CREATE OR REPLACE PROCEDURE {qualified(name)}({args})\nLANGUAGE plpgsql\nAS $fn$\n{block}\n$fn$;\n"


_PLACEHOLDER = re.compile(r"^(\s*)@(\w+)(.*)$")


def embed(body: str, **queries: str) -> str:
    """Dedent `body` and replace each line `@name<suffix>` by the pretty-printed, parse-checked SQL
    statement queries[name], indented like the placeholder, with <suffix> (e.g. ';' or ')') appended."""
    lines = []
    for line in textwrap.dedent(body).strip("\n").splitlines():
        m = _PLACEHOLDER.match(line)
        if not m:
            lines.append(line)
            continue
        indent, name, suffix = m.groups()
        if name not in queries:
            raise KeyError(f"no SQL given for placeholder @{name}")
        lines.append(textwrap.indent(sql(queries[name]), indent) + suffix)
    return "\n".join(lines)


def plpgsql(declare: str, body: str, **queries: str) -> str:
    """A PL/pgSQL block; `@name` lines in body are SQL statements built by sqlglot (see embed)."""
    declare = textwrap.dedent(declare).strip()
    out = ""
    if declare:
        out += "DECLARE\n" + textwrap.indent(declare, "  ") + "\n"
    return out + "BEGIN\n" + textwrap.indent(embed(body, **queries), "  ") + "\nEND"


# A PL/Python body boots pg_llm's Python once per backend (llm_py_boot: the finder for pg_llm.kernels, numpy),
# then imports a kernel function and returns its call: the code the offline tests import is the code that runs.
PRELUDE = "if 'pg_llm_boot' not in GD:\n    plpy.execute('SELECT llm_py_boot()')"


def kernel_body(fn: Callable, call: str) -> str:
    """A PL/Python body that imports fn from its pg_llm.kernels module and returns `call`, e.g.
    kernel_body(gelu_tile, "gelu_tile(x)")."""
    if not fn.__module__.startswith("pg_llm.kernels."):
        raise ValueError(f"{fn.__qualname__} is not in pg_llm.kernels: the server cannot import it")
    return f"{PRELUDE}\nfrom {fn.__module__} import {fn.__name__}\nreturn {call}"


def microkernel(name: str, args: str, returns: str, fn: Callable, call: str | None = None, *, note: str,
                volatility: str = "IMMUTABLE", strict: bool = True) -> str:
    """A PL/Python function returning fn(...) of a pg_llm.kernels module; `call` defaults to fn applied to the
    SQL arguments in order."""
    names = [a.split()[0] for a in args.split(",") if a.strip()]
    body = kernel_body(fn, call or f"{fn.__name__}({', '.join(names)})")
    return function(name, args, returns, body, language="plpython3u", volatility=volatility, note=note,
                    strict=strict, parallel="SAFE")
