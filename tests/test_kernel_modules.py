"""pg_llm.kernels in the server: each module's source once in the install script (llm_py_module), imported by
llm_py_boot's finder once per backend, the same code the offline tests import; no pasted helper anywhere."""
from __future__ import annotations

import re
from pathlib import Path

import psycopg

from pg_llm.gen import pymodules

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "py" / "kernels"

ORIGIN = """
CREATE OR REPLACE FUNCTION pg_temp.module_origin(name TEXT) RETURNS TEXT LANGUAGE plpython3u AS $$
import sys
m = sys.modules.get(name)
return None if m is None else m.__spec__.origin
$$"""


def test_the_script_carries_every_kernel_module_once() -> None:
    script = (ROOT / "install.sql").read_text()
    names = [n for n, _, _ in pymodules.modules()]
    assert names[:2] == ["pg_llm", "pg_llm.kernels"]
    assert {f"pg_llm.kernels.{p.stem}" for p in KERNELS.glob("*.py") if p.stem != "__init__"} == set(names[2:])
    for name, _, source in pymodules.modules():
        assert script.count(source) == 1, name
    bodies = re.findall(r"LANGUAGE plpython3u\n.*?AS \$fn\$\n(.*?)\n\$fn\$", script, re.S)
    assert len(bodies) > 30
    for body in bodies:  # a call, never a definition: each helper exists once, in its module
        assert not re.search(r"^\s*(def|class) ", body, re.M) and len(body.splitlines()) <= 5, body


def test_no_source_is_pasted_into_function_bodies() -> None:
    for path in (ROOT / "py").rglob("*.py"):
        text = path.read_text()
        assert "inspect.getsource" not in text, path
        assert "noqa: F821" not in text, path  # plpy is a module attribute (kernels.runtime), never a global


def test_modules_in_the_database_are_the_checkout_s(conn: psycopg.Connection) -> None:
    rows = dict(conn.execute("SELECT name, source FROM llm_py_module").fetchall())
    assert rows == {n: s for n, _, s in pymodules.modules()}


def test_the_server_imports_kernels_from_llm_py_module(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:  # a new backend: nothing imported yet
        c.execute(ORIGIN)
        assert c.execute("SELECT pg_temp.module_origin('pg_llm.kernels.gelu')").fetchone()[0] is None
        c.execute("SELECT llm_internal.llm_tile_stats(llm_internal.llm_float4_to_tile('{1,2,3}'))")  # any kernel boots
        assert c.execute("SELECT pg_temp.module_origin('pg_llm.kernels.tiles')").fetchone()[0] == \
            "llm_py_module:pg_llm.kernels.tiles"
        assert c.execute("SELECT pg_temp.module_origin('pg_llm.kernels.gelu')").fetchone()[0] is None  # lazily
        c.execute("SELECT llm_internal.llm_py_boot()")  # by hand: forgets what was imported (a reinstall's new code)
        assert c.execute("SELECT pg_temp.module_origin('pg_llm.kernels.tiles')").fetchone()[0] is None
        assert c.execute("SELECT llm_internal.llm_tile_to_float4(llm_internal.llm_float4_to_tile('{1.5,-2}'))"
                         ).fetchone()[0] == [1.5, -2.0]
