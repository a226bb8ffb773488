"""llm_model_init: GPT-2's initialization in SQL, reproducible for a seed, with the right statistics."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest

from train_fixtures import same, snapshot


@pytest.fixture(scope="module")
def cfg(conn: psycopg.Connection) -> str:
    conn.execute("INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size) "
                 "VALUES ('init-cfg', 2, 4, 64, 40, 1000)")
    return "init-cfg"


def test_init_statistics_and_names(conn: psycopg.Connection, cfg: str) -> None:
    conn.execute("SELECT llm_model_init('m1', %s, seed => 1)", (cfg,))
    conn.execute("SELECT llm_internal.llm_model_check('m1', TRUE)")  # every expected tensor, every tile
    p = {n: a for (n, _), a in snapshot(conn, "m1", ("param",)).items()}
    assert abs(p["wte.weight"].std() - 0.02) < 0.001 and abs(p["wte.weight"].mean()) < 0.001
    assert abs(p["h.0.attn.c_proj.weight"].std() - 0.02 / np.sqrt(4)) < 0.001
    assert (p["h.1.ln_2.weight"] == 1).all() and (p["h.1.ln_2.bias"] == 0).all()
    assert (p["h.0.mlp.c_fc.bias"] == 0).all()
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'm1'").fetchone()[0] == 0


def test_init_is_reproducible(conn: psycopg.Connection, cfg: str) -> None:
    conn.execute("SELECT llm_model_init('m2', %s, seed => 1)", (cfg,))
    conn.execute("SELECT llm_model_init('m3', %s, seed => 2)", (cfg,))
    if not conn.execute("SELECT 1 FROM llm_model WHERE name = 'm1'").fetchone():
        conn.execute("SELECT llm_model_init('m1', %s, seed => 1)", (cfg,))
    assert same(snapshot(conn, "m1", ("param",)), snapshot(conn, "m2", ("param",)))
    assert not same(snapshot(conn, "m1", ("param",)), snapshot(conn, "m3", ("param",)))


def test_init_errors(conn: psycopg.Connection, cfg: str) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match='unknown model config "nope"'):
        conn.execute("SELECT llm_model_init('x', 'nope')")
    conn.execute("SELECT llm_model_init('dup', %s)", (cfg,))
    with pytest.raises(psycopg.errors.RaiseException, match='model "dup" already exists'):
        conn.execute("SELECT llm_model_init('dup', %s)", (cfg,))
    with pytest.raises(psycopg.errors.RaiseException, match="seed must not be NULL"):
        conn.execute("SELECT llm_model_init('x', %s, seed => NULL)", (cfg,))
    with pytest.raises(psycopg.errors.RaiseException, match="a model name has at most 200 bytes, got 10000"):
        conn.execute("SELECT llm_model_init(%s, %s)", ("é" * 5000, cfg))
    assert conn.execute("SELECT count(*) FROM llm_model WHERE name = 'x' OR length(name) > 200").fetchone()[0] == 0
