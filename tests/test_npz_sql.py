"""pg_llm_import_npz / pg_llm_export_npz: .npz files read and written by the server process, allowed to
superusers and members of pg_read_server_files / pg_write_server_files only; llm_param shows the weights."""
from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pg_llm.config import STANDARD, GPT2Config
from pg_llm.kernels.npz import infer_standard
from pg_llm.loader.state import export_state
from pg_llm.loader.tensors import read_tensor

from gpt2_fixtures import import_tiny
from helpers import made_roles


def params(conn: psycopg.Connection, model: str) -> dict[str, np.ndarray]:
    rows = conn.execute("SELECT name, id FROM llm_tensor WHERE model = %s AND role = 'param' AND id > 0",
                        (model,)).fetchall()
    return {n: read_tensor(conn, i) for n, i in rows}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a)


def fingerprint(conn: psycopg.Connection) -> tuple:
    return conn.execute("""
        SELECT (SELECT count(*) FROM llm_tensor), (SELECT count(*) FROM llm_model),
               (SELECT count(*) FROM llm_model_config),
               (SELECT md5(string_agg(md5(data), ',' ORDER BY tensor_id, tr, tc)) FROM llm_tile)""").fetchone()


@pytest.fixture(scope="module")
def src(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> str:
    import_tiny(conn, tmp_path_factory.mktemp("src"), "src")
    return "src"


def server_file(d: Path, name: str, arrays: dict[str, np.ndarray], compressed: bool = False) -> str:
    p = d / name
    (np.savez_compressed if compressed else np.savez)(p, **arrays)
    os.chmod(p, 0o644)
    return str(p)


def test_superuser_round_trip(conn: psycopg.Connection, src: str, shared_dir: Path) -> None:
    path = str(shared_dir / "src.npz")
    n = conn.execute("SELECT pg_llm_export_npz(path => %s, model => %s)", (path, src)).fetchone()[0]
    want = params(conn, src)
    assert n == sum(a.size for a in want.values())
    z = np.load(path)
    assert list(z.files) == list(GPT2Config(n_layer=2, n_head=3, n_embd=48, n_ctx=37, vocab_size=301).param_shapes())
    assert same_bits({k: z[k] for k in z.files}, want)
    # a tiny config is no standard one: import into a model created with its config (it keeps its config)
    conn.execute("SELECT llm_model_create('back', 'src')")
    assert conn.execute("SELECT pg_llm_import_npz(%s, 'back')", (path,)).fetchone()[0] == n
    assert same_bits(params(conn, "back"), want)
    # compressed export; Hugging Face names + buffers + tied lm_head; gzip around the archive
    cpath = str(shared_dir / "src_c.npz")
    conn.execute("SELECT pg_llm_export_npz(%s, %s, compressed => TRUE)", (cpath, src))
    assert same_bits(dict(np.load(cpath)), want)
    hf = {"transformer." + k: v for k, v in want.items()} | {"lm_head.weight": want["wte.weight"],
                                                            "transformer.h.0.attn.bias": np.ones((1, 1, 37, 37))}
    gz = shared_dir / "hf.npz.gz"
    gz.write_bytes(gzip.compress(Path(server_file(shared_dir, "hf.npz", hf, compressed=True)).read_bytes()))
    os.chmod(gz, 0o644)
    for i, p in enumerate((str(shared_dir / "hf.npz"), str(gz))):
        conn.execute("SELECT llm_model_create(%s, 'src')", (f"hf{i}",))
        conn.execute("SELECT pg_llm_import_npz(%s, %s)", (p, f"hf{i}"))
        assert same_bits(params(conn, f"hf{i}"), want)
    # llm_param: the weights as float4[] per tile, and row-wise
    rows = conn.execute("SELECT shape, tr, tc, vals FROM llm_param WHERE model = 'back' AND name = 'wpe.weight' "
                        "ORDER BY tr, tc").fetchall()
    th, tw = conn.execute("SELECT tile FROM llm_tensor WHERE model = 'back' AND name = 'wpe.weight'").fetchone()[0]
    got = np.zeros((37, 48), np.float32)
    for shape, tr, tc, vals in rows:
        assert shape == [37, 48]
        block = got[tr * th:(tr + 1) * th, tc * tw:(tc + 1) * tw]
        block[...] = np.asarray(vals, np.float32).reshape(block.shape)
    assert np.array_equal(got, want["wpe.weight"])
    r = conn.execute("SELECT vals FROM llm_param_rows WHERE model = 'back' AND name = 'h.1.ln_2.bias'").fetchall()
    assert len(r) == 1 and np.array_equal(np.asarray(r[0][0], np.float32), want["h.1.ln_2.bias"])
    assert conn.execute("SELECT count(DISTINCT name) FROM llm_param WHERE model = 'back'").fetchone()[0] == 28


def test_config_from_metadata_or_shapes(conn: psycopg.Connection, src: str, shared_dir: Path) -> None:
    want = params(conn, src)
    meta = shared_dir / "state.npz"
    export_state(conn, src, meta)  # a pg-llm checkpoint file: its metadata names config 'src'
    os.chmod(meta, 0o644)
    conn.execute("SELECT pg_llm_import_npz(%s, 'from_meta')", (str(meta),))
    assert conn.execute("SELECT config FROM llm_model WHERE name = 'from_meta'").fetchone()[0] == "src"
    assert same_bits(params(conn, "from_meta"), want)
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE model = 'from_meta' AND role <> 'param'"
                        ).fetchone()[0] == 0  # weights only
    plain = server_file(shared_dir, "plain.npz", want)
    msg = r"has no config and its sizes \(n_layer=2, n_embd=48, n_ctx=37, vocab_size=301\) match no standard config"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=msg) as e:
        conn.execute("SELECT pg_llm_import_npz(%s, 'inferred')", (plain,))
    assert "llm_model_create('inferred', 'CONFIG')" in e.value.diag.message_hint
    # the shape rule picks the standard row whose sizes match (made tiny here: a real 124M file is 500 MB)
    conn.execute("UPDATE llm_model_config SET n_layer = 2, n_head = 3, n_embd = 48, n_ctx = 37, vocab_size = 301 "
                 "WHERE name = 'gpt2-medium'")
    conn.execute("SELECT pg_llm_import_npz(%s, 'inferred')", (plain,))
    assert conn.execute("SELECT config FROM llm_model WHERE name = 'inferred'").fetchone()[0] == "gpt2-medium"
    assert same_bits(params(conn, "inferred"), want)
    shapes = STANDARD["gpt2-small"].param_shapes()
    rows = [(n, c.n_layer, c.n_embd, c.n_ctx, c.vocab_size) for n, c in STANDARD.items()]
    assert infer_standard(shapes, rows)[0] == "gpt2-small"  # the playbook's 124M checkpoint


@pytest.mark.parametrize("case,msg,state", [
    ("nan", "tensor 'h.1.attn.c_proj.weight' has 1 NaN/Inf value", "22023"),
    ("shape", r"wrong shape: wpe.weight has shape \(36, 48\), expected \(37, 48\)", "22023"),
    ("missing", r"1 missing tensor\(s\): ln_f.bias", "22023"),
    ("untied", "lm_head.weight differs from wte.weight", "22023"),
    ("exists", 'model "src" already exists with 28 tensors', "42710"),
    ("nofile", "no such file on the database server", "58P01"),
    ("notzip", "not a zip archive", "22023"),
])
def test_import_errors_change_nothing(conn: psycopg.Connection, src: str, shared_dir: Path, case: str, msg: str,
                                      state: str) -> None:
    ps = params(conn, src)
    model = "src" if case == "exists" else "target"
    conn.execute("SELECT llm_model_create('target', 'src') WHERE NOT EXISTS (SELECT 1 FROM llm_model "
                 "WHERE name = 'target')")
    if case == "nan":
        ps["h.1.attn.c_proj.weight"][2, 3] = np.inf
    elif case == "shape":
        ps["wpe.weight"] = ps["wpe.weight"][:36]
    elif case == "missing":
        del ps["ln_f.bias"]
    elif case == "untied":
        ps["lm_head.weight"] = ps["wte.weight"] + 1
    path = server_file(shared_dir, f"{case}.npz", ps)
    if case == "nofile":
        path = str(shared_dir / "nope.npz")
    elif case == "notzip":
        Path(path).write_bytes(b"\x93NUMPY not an archive")
    before = fingerprint(conn)
    with pytest.raises(psycopg.Error, match=msg) as e:
        conn.execute("SELECT pg_llm_import_npz(%s, %s)", (path, model))
    assert e.value.diag.sqlstate == state
    assert e.value.diag.message_primary.startswith("pg_llm: pg_llm_import_npz: ")  # no PL/Python class prefix
    assert fingerprint(conn) == before


@pytest.fixture
def roles(conn: psycopg.Connection) -> Iterator[dict[str, str]]:
    """Non-superuser trainers (cluster-wide: unique names), two of them allowed to read or write server files."""
    with made_roles(conn, {"npz_plain": "IN ROLE llm_trainer",
                           "npz_reader": "IN ROLE llm_trainer, pg_read_server_files",
                           "npz_writer": "IN ROLE llm_trainer, pg_write_server_files"}) as made:
        yield {"plain": made["npz_plain"], "reader": made["npz_reader"], "writer": made["npz_writer"]}


def test_server_file_privileges(conn: psycopg.Connection, src: str, shared_dir: Path, roles: dict[str, str]) -> None:
    path = str(shared_dir / "priv.npz")
    conn.execute("SELECT pg_llm_export_npz(%s, %s)", (path, src))
    os.chmod(path, 0o644)
    conn.execute("SELECT llm_model_create('by_reader', 'src')")
    for r in roles.values():  # the superuser's model: each role may load weights into it
        conn.execute("SELECT llm_model_grant('by_reader', %s)", (r,))
    before = fingerprint(conn)
    conn.execute(f"SET ROLE {roles['plain']}")
    assert not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    for sql, what, hint in (("SELECT pg_llm_import_npz(%s, 'by_reader')", "read", "pg-llm model import"),
                            ("SELECT pg_llm_export_npz(%s, 'src')", "write", "pg-llm model export"),
                            ("SELECT llm_internal.llm_npz_import(%s, 'by_reader')", "read", "pg-llm model import")):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"permission denied to {what} the server file"
                           ) as e:
            conn.execute(sql, (path,))
        assert hint in e.value.diag.message_hint
        assert f"pg_{what}_server_files" in e.value.diag.message_detail
    conn.execute("RESET ROLE")
    assert fingerprint(conn) == before
    conn.execute(f"SET ROLE {roles['reader']}")
    conn.execute("SELECT pg_llm_import_npz(%s, 'by_reader')", (path,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied to write"):
        conn.execute("SELECT pg_llm_export_npz(%s, 'src')", (str(shared_dir / "r.npz"),))
    conn.execute(f"SET ROLE {roles['writer']}")
    conn.execute("SELECT pg_llm_export_npz(%s, 'by_reader')", (str(shared_dir / "w.npz"),))
    conn.execute("RESET ROLE")
    assert same_bits(params(conn, "by_reader"), params(conn, src))
    assert same_bits(dict(np.load(shared_dir / "w.npz")), params(conn, src))
