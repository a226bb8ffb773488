"""A backend that trains keeps the memory numpy frees (kernels/runtime.keep_freed_memory): freeing a large array
leaves it with the process, and allocating it again faults no new pages. Each case runs in a process of its own,
since mallopt changes the whole process."""
from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from gpt2_fixtures import import_tiny
from train_fixtures import synthetic_dataset

CHILD = """
import resource, sys
import numpy as np
from pg_llm.kernels.runtime import keep_freed_memory

def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1024

GD = {}
kept = sys.argv[1] == 'keep' and keep_freed_memory(GD) and keep_freed_memory(GD)  # twice: once per backend
a = np.ones(64 << 20, dtype=np.float32)  # 256 MB, touched
before = rss_mb()
del a
after = rss_mb()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(64 << 20, dtype=np.float32)
print(kept, before - after, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(mode: str) -> tuple[bool, float, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    kept, freed, faults = out.split()
    return kept == "True", float(freed), int(faults)


def test_freed_memory_stays_and_is_reused() -> None:
    kept, freed, faults = _run("keep")
    assert kept
    assert freed < 16, f"{freed:.0f} MB of the freed 256 MB left the process"
    assert faults < 256, f"allocating the freed 256 MB again faulted {faults} pages"


def test_by_default_it_is_returned() -> None:
    """The control: without it, glibc unmaps the array at once (the test above is not passing by accident)."""
    kept, freed, _ = _run("default")
    assert not kept
    assert freed > 200


def test_a_training_step_turns_it_on(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> None:
    import_tiny(conn, tmp_path_factory.mktemp("malloc"), "mal")
    synthetic_dataset(conn, "mal_ds", rows=4, val_rows=0, block=8)
    conn.execute("SELECT llm_train_step(%s, dataset => 'mal_ds', batch_size => 2)", ("mal",))
    conn.execute("CREATE OR REPLACE FUNCTION pg_temp.kept() RETURNS TEXT LANGUAGE plpython3u AS "
                 "$$ return str(GD.get('llm_malloc_kept')) $$")
    assert conn.execute("SELECT pg_temp.kept()").fetchone()[0] == "True"
