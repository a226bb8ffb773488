"""What kernel modules share inside the server: PL/Python's plpy, and errors in pg_llm's form. Offline tests
bind a fake plpy (tests/helpers.FakePlpy)."""
from __future__ import annotations

from typing import Any

try:
    import plpy  # inside PostgreSQL: PL/Python's module
except ImportError:  # offline
    plpy: Any = None


def bind(module: Any) -> None:
    """Use `module` as plpy (tests)."""
    global plpy
    plpy = module


def error(msg: str, hint: str | None = None) -> None:
    """Raise a pg_llm error (message 'pg_llm: ...', optional HINT) through plpy."""
    if hint is None:
        plpy.error(msg)
    plpy.error(msg, hint=hint)
