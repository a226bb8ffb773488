"""Imports `pg_llm.*` inside PostgreSQL from table llm_py_module. llm_py_boot() compiles this module from
that table and calls install() once per backend (again when called by hand: after a reinstall, it reloads).

numpy comes first: pg_llm's pip wheel (fast OpenBLAS; `make setup` puts it in SERVER_PYTHON, pg-llm's
clusters set PG_LLM_SERVER_PYTHON) before Debian's, which runs on the reference BLAS."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

SERVER_PYTHON = "/usr/local/lib/pg_llm/python3"
QUERY = "SELECT m.is_package, m.source FROM llm_py_module AS m WHERE m.name = $1"


class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads pg_llm and pg_llm.kernels.* from llm_py_module (one SPI query per module, once)."""

    pg_llm_finder = True  # install() recognizes an earlier boot's finder by this, not by class identity

    def __init__(self, plpy: Any) -> None:
        self.plpy = plpy
        self.plan = plpy.prepare(QUERY, ["text"])

    def _row(self, name: str) -> Any:
        rows = self.plpy.execute(self.plan, [name])
        return rows[0] if len(rows) else None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "pg_llm" and not fullname.startswith("pg_llm."):
            return None
        row = self._row(fullname)
        if row is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=f"llm_py_module:{fullname}",
                                               is_package=bool(row["is_package"]))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        row = self._row(module.__name__)
        exec(compile(row["source"], module.__spec__.origin, "exec"), module.__dict__)


def numpy_first() -> Any:
    """Put pg_llm's numpy on sys.path ahead of the system's and import it."""
    for p in reversed([p for p in (os.environ.get("PG_LLM_SERVER_PYTHON"), SERVER_PYTHON) if p and os.path.isdir(p)]):
        if p not in sys.path:
            sys.path.insert(0, p)
    import numpy

    return numpy


def install(plpy: Any, GD: dict) -> bool:
    """Forget an earlier boot's modules and finder, put a new finder first, import numpy; GD['np'] and
    GD['pg_llm_boot'] tell PL/Python bodies it is done."""
    for name in [n for n in sys.modules if n == "pg_llm" or n.startswith("pg_llm.")]:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "pg_llm_finder", False)]
    sys.meta_path.insert(0, Finder(plpy))
    try:
        GD["np"] = numpy_first()
    except ImportError as e:
        plpy.error(f"pg_llm: numpy is not importable inside PostgreSQL: {e}",
                   hint="Run make setup, or put a numpy for this Python on the postmaster PYTHONPATH.")
    GD["pg_llm_boot"] = True
    return True
