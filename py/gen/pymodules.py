"""The server's Python: every module of pg_llm.kernels, its source once, in table llm_py_module.

llm_py_boot() (gen/runtime.py) installs a finder that imports `pg_llm.*` from this table, once per backend, so
PL/Python bodies are `from pg_llm.kernels.x import f; return f(...)` and the numpy code the offline tests import
is the code the server runs. Nothing extra is copied onto the server: the install script is the artifact. A
reinstall takes effect in new sessions (modules stay imported in a backend, like a C extension's library)."""
from __future__ import annotations

import pkgutil
from pathlib import Path

import pg_llm.kernels
from pg_llm.gen.emit import comment, stmt

SQL_FILE = "kernels/02_python.sql"
ORDER = 1
COMMITTED = False  # the modules' lines are py/kernels/*.py's: only the built install scripts carry them

QUOTE = "$py$"


def modules() -> list[tuple[str, bool, str]]:
    """(name, is_package, source) of pg_llm, pg_llm.kernels and every module in it, sorted by name."""
    pkg = Path(pg_llm.kernels.__file__).parent
    out = [("pg_llm", True, '"""pg_llm inside PostgreSQL: only its kernels (pg_llm.kernels)."""\n'),
           ("pg_llm.kernels", True, (pkg / "__init__.py").read_text())]
    for info in sorted(pkgutil.iter_modules([str(pkg)]), key=lambda i: i.name):
        if info.ispkg:
            raise SystemExit(f"pg_llm.kernels.{info.name}: kernel modules are flat (no subpackages)")
        out.append((f"pg_llm.kernels.{info.name}", False, (pkg / f"{info.name}.py").read_text()))
    return out


def _insert(name: str, is_package: bool, source: str) -> str:
    if QUOTE in source:
        raise SystemExit(f"{name}: its source contains {QUOTE}, the quote that carries it")
    return (f"-- {name}: {source.count(chr(10))} lines\n"
            f"INSERT INTO llm_py_module (name, is_package, source) VALUES ('{name}', {str(is_package).upper()}, "
            f"{QUOTE}{source}{QUOTE});\n")


def emit() -> str:
    out = [comment(__doc__ or ""), stmt("""
        CREATE TABLE llm_py_module (
          name TEXT PRIMARY KEY,
          is_package BOOLEAN NOT NULL,
          source TEXT NOT NULL
        )""", "Python modules the server imports (pg_llm.kernels): source as in py/kernels/, one row each."),
        stmt("GRANT SELECT ON llm_py_module TO PUBLIC", "Every role's kernels import them: the source is no secret.")]
    out += [_insert(*m) for m in modules()]
    return "\n".join(out)
