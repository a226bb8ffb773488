"""llm_doctor(): what the server sees (version, plpython3u, numpy, BLAS, cores, sgemm speed)."""
from __future__ import annotations

import os

import psycopg


def test_doctor_reports_everything(conn: psycopg.Connection) -> None:
    rows = {name: (value, status) for name, value, status in conn.execute("SELECT * FROM llm_doctor()")}
    assert set(rows) >= {"server", "plpython3u", "numpy", "blas", "cores", "sgemm", "jit"}
    assert rows["server"][0].startswith("PostgreSQL 15")
    assert rows["plpython3u"][0].startswith("installed, Python 3.")
    assert rows["numpy"][0].split()[0].count(".") == 2
    assert int(rows["cores"][0]) == os.cpu_count()
    gflops = float(rows["sgemm"][0].split()[0])
    assert gflops > 0
    # the warning appears exactly when sgemm is slow (reference BLAS); this machine must not need it
    assert rows["sgemm"][1].startswith("warning") == (gflops < 20)
    assert "openblas" in rows["blas"][0].lower(), "pg_llm's pip numpy (OpenBLAS) should be the one imported"


def test_doctor_sizes_shared_buffers_for_training(conn: psycopg.Connection) -> None:
    """The shared_buffers row: ok for the tiny models here (the harness gives a quarter of memory, >= 512 MB);
    the advice itself from the working set's size (GPT-2 small: 124M parameters, 1.4 GB a step)."""
    value, status = conn.execute("SELECT value, status FROM llm_doctor() WHERE check_name = 'shared_buffers'"
                                 ).fetchone()
    assert value.split()[0].isdigit() and int(value.split()[0]) >= 512 and status == "ok", (value, status)
    from pg_llm.kernels.doctor import buffers_status
    value, status = buffers_status(512, 12 * 124_439_808)
    assert "1425 MB" in value and status.startswith("warning") and ">= 3362 MB" in status, status
    assert buffers_status(4096, 12 * 124_439_808)[1] == "ok"


def test_doctor_wal_settings_for_training(conn: psycopg.Connection) -> None:
    """The wal row: ok under the harness's settings; the advice from a step's WAL (GPT-2 small: 1.4 GB)."""
    value, status = conn.execute("SELECT value, status FROM llm_doctor() WHERE check_name = 'wal'").fetchone()
    assert value.startswith("min_wal_size ") and status == "ok", (value, status)
    from pg_llm.kernels.doctor import wal_status
    step = 12 * 124_439_808
    assert wal_status(80, 1024, 16, step)[1].startswith("warning: ")  # PostgreSQL's defaults
    assert "min_wal_size and max_wal_size >= 2850 MB" in wal_status(80, 4096, 256, step)[1]
    assert "min_wal_size and max_wal_size >= 2850 MB" in wal_status(2048, 2048, 256, step)[1]  # a checkpoint a step
    assert wal_status(4096, 4096, 256, step)[1] == "ok"
    assert wal_status(2850, 8192, 64, step)[1] == "ok"
    assert wal_status(4096, 4096, 16, step)[1].startswith("warning: ")  # the backend writes its WAL
    assert wal_status(80, 1024, 16, 12 * 1000)[1] == "ok"  # a tiny model's steps write little WAL
