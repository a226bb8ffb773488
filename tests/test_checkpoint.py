"""Checkpoints: llm_checkpoint_save/load/drop inside the database (bit-exact params, AdamW moments and step;
errors change nothing), `pg-llm checkpoint export/import` through local files, and `pg-llm model export
--checkpoint` into a directory transformers loads."""
from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
from transformers import GPT2LMHeadModel

from pg_llm.kernels.npz import META_KEY
from pg_llm.loader.checkpoint import CheckpointError
from pg_llm.loader.model import export_model, import_model
from pg_llm.loader.state import export_state, import_state
from pg_llm.loader.tensors import read_tensor, write_tensor, write_tiles

from gpt2_fixtures import make_hf_model

PG_CLI = [sys.executable, "-c", "import sys; from pg_llm.cli import main; sys.exit(main())"]
ROLES = ("param", "adam_m", "adam_v")
Err = psycopg.errors.RaiseException


def state(conn: psycopg.Connection, model: str) -> dict[tuple[str, str], np.ndarray]:
    rows = conn.execute("SELECT role, name, id FROM llm_tensor WHERE model = %s AND role = ANY(%s) AND id > 0",
                        (model, list(ROLES))).fetchall()
    return {(r, n): read_tensor(conn, i) for r, n, i in rows}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a)


def step(conn: psycopg.Connection, model: str) -> int:
    return conn.execute("SELECT step FROM llm_model WHERE name = %s", (model,)).fetchone()[0]


def fingerprint(conn: psycopg.Connection) -> tuple:
    """Everything a failed call must leave alone."""
    return conn.execute("""
        SELECT (SELECT count(*) FROM llm_tensor), (SELECT count(*) FROM llm_checkpoint),
               (SELECT md5(string_agg(md5(data), ',' ORDER BY tensor_id, tr, tc)) FROM llm_tile),
               (SELECT string_agg(name || '=' || step, ',' ORDER BY name) FROM llm_model),
               (SELECT string_agg(id::TEXT, ',' ORDER BY id) FROM llm_tensor)""").fetchone()


def overwrite(conn: psycopg.Connection, tid: int, arr: np.ndarray) -> None:
    """New values for an existing tensor, same id and tiling."""
    tile = conn.execute("SELECT tile FROM llm_tensor WHERE id = %s", (tid,)).fetchone()[0]
    conn.execute("DELETE FROM llm_tile WHERE tensor_id = %s", (tid,))
    write_tiles(conn, tid, np.asarray(arr, np.float32), tuple(tile))


def make_model(conn: psycopg.Connection, tmp: Path, name: str, seed: int, at_step: int) -> None:
    """A tiny model with small ragged tiles, random AdamW moments for every parameter, at step `at_step`."""
    make_hf_model(tmp / name, seed)
    import_model(conn, tmp / name, name, tile=(16, 32), replace=True)
    rng = np.random.default_rng(seed)
    for n, shape, tile in conn.execute("SELECT name, shape, tile FROM llm_tensor WHERE model = %s "
                                       "AND role = 'param'", (name,)).fetchall():
        for role in ("adam_m", "adam_v"):
            a = rng.standard_normal(shape).astype(np.float32) * (1e-3 if role == "adam_m" else 1e-6)
            write_tensor(conn, np.abs(a) if role == "adam_v" else a, n, model=name, role=role, tile=tuple(tile))
    conn.execute("UPDATE llm_model SET step = %s WHERE name = %s", (at_step, name))


@pytest.fixture(scope="module")
def ck(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> str:
    make_model(conn, tmp_path_factory.mktemp("ck"), "ck", seed=0, at_step=7)
    return "ck"


@pytest.fixture(scope="module")
def other(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> str:
    make_model(conn, tmp_path_factory.mktemp("other"), "other", seed=1, at_step=3)
    return "other"


def scramble(conn: psycopg.Connection, model: str) -> None:
    """Train-like damage: params and moments change, one moment disappears, a stray tensor appears, step moves."""
    for (role, name), a in state(conn, model).items():
        tid = conn.execute("SELECT llm_tensor(%s, %s, %s)", (model, name, role)).fetchone()[0]
        overwrite(conn, tid, a + 1)
    conn.execute("SELECT llm_tensor_drop(llm_tensor(%s, 'ln_f.bias', 'adam_v'))", (model,))
    write_tensor(conn, np.ones(5, np.float32), "stray", model=model, role="adam_m")
    conn.execute("UPDATE llm_model SET step = step + 42 WHERE name = %s", (model,))


def test_save_load_is_bit_exact(conn: psycopg.Connection, ck: str) -> None:
    before, ids = state(conn, ck), conn.execute("SELECT name, role, id FROM llm_tensor WHERE model = %s", (ck,)
                                                ).fetchall()
    cid = conn.execute("SELECT llm_checkpoint_save(model => %s, note => 'first')", (ck,)).fetchone()[0]
    row = conn.execute("SELECT model, config, step, note, n_params, n_tensors, moments, bytes, model_exists "
                       "FROM llm_checkpoints WHERE id = %s", (cid,)).fetchone()
    n_params = sum(a.size for (r, _), a in before.items() if r == "param")
    assert row == ("ck", "ck", 7, "first", n_params, len(before), ["adam_m", "adam_v"], 4 * n_params * 3, True)
    assert same_bits(state(conn, f"@ckpt/{cid}"), before)  # the snapshot is a copy ...
    scramble(conn, ck)
    assert not same_bits(state(conn, ck), before)  # ... so changing the model leaves it alone
    got = conn.execute("SELECT id, step FROM llm_checkpoint_load(model => %s, id => %s)", (ck, cid)).fetchone()
    assert got == (cid, 7)
    assert same_bits(state(conn, ck), before)
    assert step(conn, ck) == 7
    # tensors kept their ids (only the re-created adam_v of ln_f.bias is new); the model is complete again
    now = {(n, r): i for n, r, i in conn.execute("SELECT name, role, id FROM llm_tensor WHERE model = %s", (ck,))}
    kept = {(n, r): i for n, r, i in ids if (n, r) != ("ln_f.bias", "adam_v")}
    assert kept.items() <= now.items() and len(now) == len(ids)
    conn.execute("SELECT llm_internal.llm_model_check(%s, TRUE)", (ck,))


def test_load_forgets_later_train_log(conn: psycopg.Connection, ck: str) -> None:
    if conn.execute("SELECT to_regclass('llm_train_log') IS NULL").fetchone()[0]:
        pytest.skip("no llm_train_log in this install")
    cid = conn.execute("SELECT llm_checkpoint_save(%s)", (ck,)).fetchone()[0]
    cols = conn.execute("""SELECT column_name, data_type FROM information_schema.columns WHERE table_name =
        'llm_train_log' AND is_nullable = 'NO' AND column_default IS NULL""").fetchall()
    dummy = {"text": "x", "integer": 1, "bigint": 1, "double precision": 1.0, "real": 1.0, "jsonb": "{}"}
    for s in range(1, 12):
        vals = {c: dummy.get(t, 1) for c, t in cols} | {"model": ck, "step": s}
        conn.execute(f"INSERT INTO llm_train_log ({', '.join(vals)}) VALUES ({', '.join(['%s'] * len(vals))})",
                     list(vals.values()))
    conn.execute("SELECT llm_checkpoint_load(%s, %s)", (ck, cid))
    steps = [r[0] for r in conn.execute("SELECT step FROM llm_train_log WHERE model = %s ORDER BY step", (ck,))]
    assert steps == list(range(1, step(conn, ck) + 1))
    conn.execute("DELETE FROM llm_train_log WHERE model = %s", (ck,))


def test_errors_change_nothing(conn: psycopg.Connection, ck: str, other: str) -> None:
    mine = conn.execute("SELECT llm_checkpoint_save(%s)", (ck,)).fetchone()[0]
    theirs = conn.execute("SELECT llm_checkpoint_save(%s, 'theirs')", (other,)).fetchone()[0]
    conn.execute("SELECT llm_model_create('gone', 'ck')")
    for (role, n), a in state(conn, ck).items():
        if role == "param":
            write_tensor(conn, a, n, model="gone", role=role)
    gone = conn.execute("SELECT llm_checkpoint_save('gone')").fetchone()[0]
    conn.execute("SELECT llm_model_drop('gone')")
    assert conn.execute("SELECT model_exists FROM llm_checkpoints WHERE id = %s", (gone,)).fetchone()[0] is False
    conn.execute("SELECT llm_model_create('gone', 'ck')")  # a new model under the old name is not the saved one
    assert conn.execute("SELECT model_exists FROM llm_checkpoints WHERE id = %s", (gone,)).fetchone()[0] is False
    conn.execute("SELECT llm_model_drop('gone')")

    def fails(sql: str, args: tuple, msg: str, hint: str | None = None) -> None:
        before = fingerprint(conn)
        with pytest.raises(Err, match=msg) as e:
            conn.execute(sql, args)
        if hint:
            assert hint in (e.value.diag.message_hint or ""), e.value.diag.message_hint
        assert fingerprint(conn) == before, sql

    fails("SELECT llm_checkpoint_load(%s, 999999)", (ck,), "unknown checkpoint 999999",
          f"{mine} (step 7). Save one with")
    fails("SELECT llm_checkpoint_load(%s, %s)", (ck, theirs), f'checkpoint {theirs} belongs to model "other", not "ck"',
          f"pg-llm checkpoint export --model other --id {theirs}")
    fails("SELECT llm_checkpoint_load('gone', %s)", (gone,), r'model "gone" does not exist \(checkpoint \d+ was saved',
          "llm_model_create('gone', 'ck')")
    conn.execute("SELECT llm_model_create('gone', 'gpt2-small')")  # same name, other config
    fails("SELECT llm_checkpoint_load('gone', %s)", (gone,),
          r'checkpoint \d+ \(config ck\) does not fit model "gone" \(config gpt2-small\): h.0.attn.c_attn.bias')
    with pytest.raises(psycopg.Error) as e:  # the first differences, not every tensor (it was ~12 KB)
        conn.execute("SELECT llm_checkpoint_load('gone', %s)", (gone,))
    assert len(e.value.diag.message_primary) < 800 and re.search(r"; and \d+ more$", e.value.diag.message_primary)
    fails("SELECT llm_checkpoint_save('gone')", (), "lacks parameter tensors")
    fails("SELECT llm_checkpoint_save('nope')", (), 'unknown model "nope"')
    fails("SELECT llm_checkpoint_drop(999999)", (), "unknown checkpoint 999999")
    fails("SELECT llm_model_create('@ckpt/1', 'ck')", (), "reserved")
    assert conn.execute("SELECT llm_checkpoint_drop(999999, if_exists => TRUE)").fetchone()[0] == 0
    conn.execute("SELECT llm_model_drop('gone')")


def test_drop(conn: psycopg.Connection, ck: str) -> None:
    cid = conn.execute("SELECT llm_checkpoint_save(%s)", (ck,)).fetchone()[0]
    n = conn.execute("SELECT n_tensors FROM llm_checkpoint WHERE id = %s", (cid,)).fetchone()[0]
    assert conn.execute("SELECT llm_checkpoint_drop(id => %s)", (cid,)).fetchone()[0] == n
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE model = %s", (f"@ckpt/{cid}",)).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM llm_checkpoints WHERE id = %s", (cid,)).fetchone()[0] == 0


@pytest.mark.parametrize("layout", ["state.npz", "compressed.npz", "state_dir"])
def test_file_round_trip(conn: psycopg.Connection, ck: str, tmp_path: Path, layout: str) -> None:
    out = tmp_path / layout
    r = export_state(conn, ck, out, compress=layout.startswith("compressed"))
    assert (r.tensors, r.moments, r.step) == (28, 56, 7)
    if out.suffix == ".npz":
        z = np.load(out)
        assert {"wte.weight", "adam_m/wte.weight", "adam_v/h.1.mlp.c_proj.bias", META_KEY} <= set(z.files)
    else:
        assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "optimizer.safetensors",
                                                   "pg_llm.json"}
    copy = f"copy_{out.stem}"
    got = import_state(conn, out, copy)
    assert (got.config, got.step, got.state_tensors) == ("ck", 7, 56)
    assert same_bits(state(conn, copy), state(conn, ck))
    assert step(conn, copy) == 7
    with pytest.raises(FileExistsError):
        export_state(conn, ck, out)
    with pytest.raises(ValueError, match="already exists; pass --replace"):
        import_state(conn, out, copy)
    # model import takes the weights only
    import_model(conn, out, f"w_{out.stem}")
    assert same_bits(state(conn, f"w_{out.stem}"), {k: v for k, v in state(conn, ck).items() if k[0] == "param"})


def test_checkpoint_file_export_and_cli(conn: psycopg.Connection, dsn: str, ck: str, other: str,
                                        tmp_path: Path) -> None:
    saved = state(conn, ck)
    cid = conn.execute("SELECT llm_checkpoint_save(%s, 'for export')", (ck,)).fetchone()[0]
    scramble(conn, ck)
    out = tmp_path / "c.npz"
    cli = subprocess.run([*PG_CLI, "checkpoint", "export", "--model", ck, "--id", str(cid), str(out), "--dsn", dsn,
                          "-q"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert f"checkpoint {cid}" in cli.stdout and "step 7" in cli.stdout
    cli = subprocess.run([*PG_CLI, "checkpoint", "import", "--model", "from_cli", str(out), "--dsn", dsn, "-q"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert same_bits(state(conn, "from_cli"), saved) and step(conn, "from_cli") == 7
    bad = subprocess.run([*PG_CLI, "checkpoint", "export", "--model", ck, "--id", str(cid), str(out), "--dsn", dsn],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "pass --force" in bad.stderr
    theirs = conn.execute("SELECT llm_checkpoint_save(%s)", (other,)).fetchone()[0]
    with pytest.raises(Err, match=f'checkpoint {theirs} belongs to model "other", not "ck"'):
        export_state(conn, ck, tmp_path / "x.npz", checkpoint=theirs)
    conn.execute("SELECT llm_checkpoint_load(%s, %s)", (ck, cid))  # leave ck as the other tests expect it
    for args in (["checkpoint", "--help"], ["checkpoint", "export", "--help"], ["checkpoint", "import", "--help"]):
        h = subprocess.run([*PG_CLI, *args], capture_output=True, text=True)
        assert h.returncode == 0 and "usage: pg-llm checkpoint" in h.stdout


def _bad_state_file(src: Path, dst: Path, edit: str) -> Path:
    z = dict(np.load(src))
    if edit == "nan":
        z["adam_v/h.0.attn.c_attn.weight"][1, 2] = np.nan
    elif edit == "shape":
        z["adam_m/wpe.weight"] = z["adam_m/wpe.weight"][:5]
    else:
        z["adam_m/h.7.ln_1.weight"] = z["adam_m/h.0.ln_1.weight"]
    np.savez(dst, **z)
    return dst


@pytest.mark.parametrize("edit,msg", [("nan", "'adam_v/h.0.attn.c_attn.weight' has 1 NaN/Inf"),
                                      ("shape", r"adam_m/wpe.weight has shape \(5, 48\), expected \(37, 48\)"),
                                      ("unknown", "adam_m/h.7.ln_1.weight is not a parameter")])
def test_bad_state_file_changes_nothing(conn: psycopg.Connection, ck: str, tmp_path: Path, edit: str,
                                        msg: str) -> None:
    good = tmp_path / "good.npz"
    export_state(conn, ck, good)
    bad = _bad_state_file(good, tmp_path / "bad.npz", edit)
    before = fingerprint(conn)
    with pytest.raises(CheckpointError, match=msg):
        import_state(conn, bad, "broken")
    with pytest.raises(CheckpointError, match=msg):
        import_state(conn, bad, ck, replace=True)
    assert fingerprint(conn) == before


def test_model_export_of_a_checkpoint_loads_in_transformers(conn: psycopg.Connection, dsn: str, ck: str,
                                                            tmp_path: Path) -> None:
    saved = {n: a for (r, n), a in state(conn, ck).items() if r == "param"}
    cid = conn.execute("SELECT llm_checkpoint_save(%s)", (ck,)).fetchone()[0]
    scramble(conn, ck)
    cli = subprocess.run([*PG_CLI, "model", "export", "--name", ck, "--checkpoint", str(cid), str(tmp_path / "hf"),
                          "--dsn", dsn, "-q"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    m = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in m.state_dict().items()}
    for n, a in saved.items():
        assert np.array_equal(sd[n].view(np.uint32), a.view(np.uint32)), n
    assert np.array_equal(sd["lm_head.weight"], saved["wte.weight"])
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(Err, match="unknown checkpoint 999999"):
        export_model(conn, ck, tmp_path / "none", checkpoint=999999)
    conn.execute("SELECT llm_checkpoint_load(%s, %s)", (ck, cid))


def test_gzip_wrapped_npz(conn: psycopg.Connection, ck: str, tmp_path: Path) -> None:
    import gzip

    export_state(conn, ck, tmp_path / "s.npz", compress=True)
    (tmp_path / "s.npz.gz").write_bytes(gzip.compress((tmp_path / "s.npz").read_bytes()))
    import_state(conn, tmp_path / "s.npz.gz", "from_gz")
    assert same_bits(state(conn, "from_gz"), state(conn, ck)) and step(conn, "from_gz") == 7


def test_cli_save_list_load_drop(conn: psycopg.Connection, dsn: str, ck: str) -> None:
    def run(*args: str) -> str:
        p = subprocess.run([*PG_CLI, "checkpoint", *args, "--dsn", dsn], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    before = state(conn, ck)
    out = run("save", "--model", ck, "--note", "cli")
    cid = int(out.split()[2])
    assert f"saved checkpoint {cid} of model 'ck' at step 7" in out
    assert f"{cid}\tmodel=ck\tstep=7\tmoments=adam_m,adam_v" in run("list", "--model", ck)
    scramble(conn, ck)
    assert "restored from checkpoint" in run("load", "--model", ck, "--id", str(cid))
    assert same_bits(state(conn, ck), before) and step(conn, ck) == 7
    assert f"dropped checkpoint {cid}" in run("drop", "--id", str(cid))
    p = subprocess.run([*PG_CLI, "checkpoint", "load", "--model", ck, "--id", str(cid), "--dsn", dsn],
                       capture_output=True, text=True)
    assert p.returncode == 1 and f"unknown checkpoint {cid}" in p.stderr


def test_training_resumes_from_a_checkpoint_exactly(conn: psycopg.Connection, tmp_path: Path) -> None:
    """Step s's randomness derives from (seed, s): load a checkpoint, train again, get the same model."""
    if conn.execute("SELECT to_regproc('llm_train_step') IS NULL").fetchone()[0]:
        pytest.skip("llm_train_step is not installed")
    from train_fixtures import synthetic_dataset

    make_hf_model(tmp_path / "rt", 3)
    import_model(conn, tmp_path / "rt", "rt")
    synthetic_dataset(conn, "rt_data")

    def train(n: int) -> list[float]:
        return [conn.execute("SELECT loss FROM llm_train_step(model => 'rt', dataset => 'rt_data', batch_size => 2, "
                             "warmup_steps => 2, max_steps => 8)").fetchone()[0] for _ in range(n)]

    train(2)
    cid = conn.execute("SELECT llm_checkpoint_save('rt')").fetchone()[0]
    first = train(2)
    after = state(conn, "rt")
    conn.execute("SELECT llm_checkpoint_load('rt', %s)", (cid,))
    assert step(conn, "rt") == 2
    assert conn.execute("SELECT max(step) FROM llm_train_log WHERE model = 'rt'").fetchone()[0] == 2
    assert train(2) == first
    assert same_bits(state(conn, "rt"), after)
