"""Bad training arguments are refused before anything is written: NULL, NaN, infinities, out-of-range values, a
batch larger than the split, steps <= 0, a made-up on_behalf_of (each reported; several used to commit a step,
and batch_size => NULL or 100000 ran one step over the whole dataset)."""
from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from gpt2_fixtures import import_tiny
from train_fixtures import synthetic_dataset

OK = {"dataset": "'ds'", "batch_size": "2", "lr": "1e-3", "warmup_steps": "1"}


def args(**override: str) -> str:
    return ", ".join(f"{k} => {v}" for k, v in {**OK, **override}.items())


@pytest.fixture(scope="module")
def model(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> str:
    synthetic_dataset(conn, "ds")  # 8 train rows
    import_tiny(conn, tmp_path_factory.mktemp("bounds"), "m")
    return "m"


def fingerprint(conn: psycopg.Connection) -> tuple:
    return conn.execute("""
        SELECT (SELECT count(*) FROM llm_train_log), (SELECT count(*) FROM llm_train_job),
               (SELECT count(*) FROM llm_tensor), (SELECT sum(step) FROM llm_model),
               (SELECT md5(string_agg(md5(data), ',' ORDER BY tensor_id, tr, tc)) FROM llm_tile)""").fetchone()


STEP_CASES = [
    ("batch_size => 100000", "batch_size must be between 1 and the 8 rows of split \"train\""),
    ("batch_size => NULL", "batch_size must be between 1 and the 8 rows"),
    ("batch_size => 0", "batch_size must be between 1"),
    ("warmup_steps => -1", "warmup_steps must be >= 0, got -1"),
    ("max_steps => 0", "max_steps must be >= 1"),
    ("min_lr => 'NaN'", "min_lr must be between 0 and lr"),
    ("min_lr => 1.0", "min_lr must be between 0 and lr"),
    ("lr => 'NaN'", "lr must be > 0, got NaN"),
    ("lr => 'Infinity'", "lr must be > 0, got Infinity"),
    ("lr => NULL", "lr must be > 0, got NULL"),
    ("weight_decay => NULL", "weight_decay must be >= 0"),
    ("beta1 => 1", r"beta1 must be in \[0, 1\)"),
    ("beta2 => -0.5", r"beta2 must be in \[0, 1\)"),
    ("eps => 0", "eps must be > 0"),
    ("grad_clip => -1", "grad_clip must be >= 0"),
    ("dropout => 1", r"dropout must be in \[0, 1\)"),
    ("grad_accum => 0", "grad_accum must be >= 1"),
    ("seed => -1", "seed must be >= 0"),
    ("seed => NULL", "seed must be >= 0, got NULL"),
    ("split => 'nope'", "dataset \"ds\" has no rows in split \"nope\""),
    ("on_behalf_of => 424242", "on_behalf_of 424242 is not the pid of this model's training loop"),
]


@pytest.mark.parametrize("arg,match", STEP_CASES)
def test_step_refuses_before_writing(conn: psycopg.Connection, model: str, arg: str, match: str) -> None:
    before = fingerprint(conn)
    name, value = arg.split(" => ")
    with pytest.raises(psycopg.Error, match=match) as e:
        conn.execute(f"SELECT llm_train_step('m', {args(**{name: value})})")
    assert e.value.diag.message_primary.startswith("pg_llm: llm_train_step: ") and e.value.diag.message_hint
    assert fingerprint(conn) == before


@pytest.mark.parametrize("call", ["SELECT llm_train", "CALL llm_train_run"])
@pytest.mark.parametrize("loop,match", [
    ("-5, dataset => 'ds', batch_size => 0, lr => 'NaN'", "steps must be >= 1, got -5"),
    ("0, dataset => 'ds'", "steps must be >= 1, got 0"),
    ("NULL, dataset => 'ds'", "steps must be >= 1, got NULL"),
    ("3, dataset => 'ds', eval_rows => 0", "need eval_every >= 0 and eval_rows >= 1"),
    ("3, dataset => 'ds', batch_size => 9", "batch_size must be between 1 and the 8 rows"),
    ("3, dataset => 'ds', min_lr => 1.0, lr => 1e-4", "min_lr must be between 0 and lr"),
])
def test_loops_refuse_before_claiming(conn: psycopg.Connection, model: str, call: str, loop: str, match: str) -> None:
    before = fingerprint(conn)
    with pytest.raises(psycopg.Error, match=match) as e:
        conn.execute(f"{call}('m', {loop})")
    assert e.value.diag.message_hint
    assert fingerprint(conn) == before  # no llm_train_job row either


def test_step_without_a_dataset_says_so(conn: psycopg.Connection, model: str) -> None:
    with pytest.raises(psycopg.Error, match="dataset must be named") as e:
        conn.execute("SELECT llm_train_step('m', NULL)")
    assert "dataset =>" in e.value.diag.message_hint


def test_good_arguments_still_train(conn: psycopg.Connection, model: str, tmp_path: Path) -> None:
    before = conn.execute("SELECT step FROM llm_model WHERE name = 'm'").fetchone()[0]
    conn.execute(f"SELECT llm_train_step('m', {args(grad_clip='NULL', min_lr='0', max_steps='NULL')})")
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'm'").fetchone()[0] == before + 1
