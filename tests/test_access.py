"""The access model as real roles (docs/access.md): PUBLIC gets nothing, llm_reader runs inference, llm_trainer
trains what it owns or was granted, and nothing a role may not change changes, through the API or plain SQL."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pg_llm.gen.surface import PUBLIC
from pg_llm.loader.tokenizer import ensure_gpt2

from gpt2_fixtures import import_tiny
from helpers import made_roles
from train_fixtures import same, snapshot, synthetic_dataset

STEP = "dataset => 'ds', batch_size => 2, lr => 1e-3, warmup_steps => 1, max_steps => 4, dropout => 0.1, seed => 3"
TOKENS = "'{1,2,3,250}'"


@pytest.fixture(scope="module")
def roles(conn: psycopg.Connection, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """'adm' (the superuser's model, its config 'adm'), a dataset, and four roles: nobody, a reader, two trainers."""
    ensure_gpt2(conn)
    import_tiny(conn, tmp_path_factory.mktemp("access"), "adm")
    synthetic_dataset(conn, "ds")
    with made_roles(conn, {"nobody": "", "reader": "IN ROLE llm_reader", "alice": "IN ROLE llm_trainer",
                           "bob": "IN ROLE llm_trainer"}) as made:
        yield made


def as_role(conn: psycopg.Connection, role: str, sql: str, *args: object) -> list[tuple]:
    conn.execute(f"SET ROLE {role}")
    try:
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description else []
    finally:
        conn.execute("RESET ROLE")


def denied(conn: psycopg.Connection, role: str, match: str, sql: str, *args: object) -> None:
    with pytest.raises(psycopg.errors.Error, match=match):
        as_role(conn, role, sql, *args)


def test_public_gets_nothing(conn: psycopg.Connection, roles: dict[str, str]) -> None:
    who = roles["nobody"]
    denied(conn, who, "permission denied for function llm_logits", f"SELECT llm_logits('adm', {TOKENS})")
    denied(conn, who, "permission denied for function llm_encode", "SELECT llm_encode('hi')")
    denied(conn, who, "permission denied for schema llm_internal", "SELECT llm_internal.llm_mk_add('', '')")
    for table in ("llm_tile", "llm_model", "llm_bpe_vocab", "llm_tensors"):
        denied(conn, who, f"permission denied for (table|view) {table}", f"SELECT count(*) FROM {table}")


def test_internals_are_outside_the_users_namespace(conn: psycopg.Connection, roles: dict[str, str]) -> None:
    in_public = {r[0] for r in conn.execute("SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
                                            "AND (proname LIKE 'llm%' OR proname LIKE 'pg_llm%')")}
    assert in_public == PUBLIC
    internal = conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'llm_internal'::regnamespace"
                            ).fetchone()[0]
    assert internal > 80
    denied(conn, roles["reader"], r"function llm_mk_add\(unknown, unknown\) does not exist",
           "SELECT llm_mk_add('', '')")
    open_to_public = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc AS p
        WHERE p.pronamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace)
          AND (p.proname LIKE 'llm%' OR p.proname LIKE 'pg_llm%')
          AND has_function_privilege('public', p.oid, 'EXECUTE')""").fetchall()
    assert open_to_public == []


def test_reader_runs_inference_as_the_owner_does(conn: psycopg.Connection, roles: dict[str, str]) -> None:
    queries = [f"SELECT llm_logits('adm', {TOKENS})", "SELECT llm_encode('Readers encode, unseen words too: zyxq')",
               "SELECT llm_generate_tokens('adm', '{1,2}', max_new_tokens => 4)",
               "SELECT * FROM llm_perplexity_tokens('adm', '{1,2,3,4,5,6,7}')",
               "SELECT name, shape FROM llm_tensors WHERE model = 'adm' ORDER BY id"]
    expected = [conn.execute(q).fetchall() for q in queries]
    got = [as_role(conn, roles["reader"], q) for q in queries]
    assert got == expected
    assert conn.execute("SELECT count(*) FROM llm_tensor WHERE id < 0").fetchone()[0] == 0  # its scratch is gone


def test_reader_changes_nothing(conn: psycopg.Connection, roles: dict[str, str]) -> None:
    who, before = roles["reader"], snapshot(conn, "adm")
    vocab = conn.execute("SELECT count(*), sum(id) FROM llm_bpe_vocab").fetchone()
    denied(conn, who, "permission denied for table llm_model", "SELECT llm_model_create('r1', 'adm')")
    denied(conn, who, "may not change model", f"SELECT llm_train_step('adm', {STEP})")
    denied(conn, who, "belongs to role", "SELECT llm_model_drop('adm')")
    denied(conn, who, "permission denied for table llm_bpe_vocab", "DELETE FROM llm_bpe_vocab")
    denied(conn, who, "permission denied for table llm_bpe_cache",
           "INSERT INTO llm_bpe_cache VALUES ('gpt2', ' poisoned', '{666}')")
    # plain SQL on the tables: row-level security hides every row it may not change
    assert as_role(conn, who, "UPDATE llm_tile SET data = '' WHERE tensor_id > 0 RETURNING 1") == []
    assert as_role(conn, who, "DELETE FROM llm_tensor WHERE id > 0 RETURNING 1") == []
    denied(conn, who, "row-level security", "INSERT INTO llm_tensor (id, model, name, role, shape, tile) "
           "VALUES (99999, 'adm', 'wte.weight', 'param', '{1}', '{1,1}')")
    assert same(snapshot(conn, "adm"), before)
    assert conn.execute("SELECT count(*), sum(id) FROM llm_bpe_vocab").fetchone() == vocab


def test_trainer_trains_what_it_owns_and_nothing_else(conn: psycopg.Connection, roles: dict[str, str]) -> None:
    alice, bob = roles["alice"], roles["bob"]
    as_role(conn, alice, "SELECT llm_model_init('alice_m', 'adm', seed => 1)")
    assert conn.execute("SELECT owner::text FROM llm_model WHERE name = 'alice_m'").fetchone()[0] == alice
    as_role(conn, alice, f"SELECT llm_train_step('alice_m', {STEP})")
    ckpt = as_role(conn, alice, "SELECT llm_checkpoint_save('alice_m')")[0][0]
    before, log = snapshot(conn, "alice_m"), conn.execute("SELECT count(*) FROM llm_train_log").fetchone()
    for sql, match in [(f"SELECT llm_train_step('alice_m', {STEP})", "may not change model"),
                       (f"CALL llm_train_run('alice_m', 3, {STEP})", "may not change model"),
                       ("SELECT llm_model_drop('alice_m')", "belongs to role"),
                       (f"SELECT llm_checkpoint_load('alice_m', {ckpt})", "may not change model"),
                       (f"SELECT llm_checkpoint_drop({ckpt})", "belongs to role"),
                       ("SELECT llm_checkpoint_save('alice_m')", "may not change model"),
                       (f"SELECT llm_model_grant('alice_m', '{bob}')", "belongs to role"),
                       ("SELECT llm_dataset_drop('ds')", "belongs to role")]:
        denied(conn, bob, match, sql)
    # and by plain SQL: no row of alice's changes, no owner can be forged or taken over
    assert as_role(conn, bob, "UPDATE llm_tile SET data = data WHERE tensor_id IN "
                              "(SELECT id FROM llm_tensor WHERE model = 'alice_m') RETURNING 1") == []
    assert as_role(conn, bob, "DELETE FROM llm_model WHERE name = 'alice_m' RETURNING 1") == []
    assert as_role(conn, bob, "UPDATE llm_model SET step = 0 WHERE name = 'alice_m' RETURNING 1") == []
    denied(conn, bob, "permission denied for table llm_model", f"UPDATE llm_model SET owner = '{bob}'")
    denied(conn, bob, "row-level security", f"INSERT INTO llm_model (name, config, owner) VALUES "
                                            f"('forged', 'adm', '{alice}')")
    assert same(snapshot(conn, "alice_m"), before)
    assert conn.execute("SELECT count(*) FROM llm_train_log").fetchone() == log
    as_role(conn, alice, "SELECT llm_model_drop('alice_m')")


def test_a_grant_lets_another_role_train(conn: psycopg.Connection, roles: dict[str, str]) -> None:
    alice, bob = roles["alice"], roles["bob"]
    as_role(conn, alice, "SELECT llm_model_init('shared_m', 'adm', seed => 2)")
    as_role(conn, alice, "SELECT llm_model_grant('shared_m', %s)", bob)
    as_role(conn, bob, f"SELECT llm_train_step('shared_m', {STEP})")
    ckpt = as_role(conn, bob, "SELECT llm_checkpoint_save('shared_m')")[0][0]
    as_role(conn, bob, f"SELECT llm_checkpoint_load('shared_m', {ckpt})")
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'shared_m'").fetchone()[0] == 1
    denied(conn, bob, "belongs to role", "SELECT llm_model_drop('shared_m')")  # dropping stays the owner's
    as_role(conn, alice, f"SELECT llm_checkpoint_drop({ckpt})")  # the model's owner may drop bob's checkpoint
    assert as_role(conn, alice, "SELECT llm_model_revoke('shared_m', %s)", bob) == [(True,)]
    denied(conn, bob, "may not change model", f"SELECT llm_train_step('shared_m', {STEP})")
    as_role(conn, alice, "SELECT llm_model_drop('shared_m')")


def test_trainers_train_with_call_and_get_a_clear_error_from_select(conn: psycopg.Connection,
                                                                    roles: dict[str, str]) -> None:
    """SELECT llm_train needs a loopback connection an ordinary role cannot open without a password; the
    error says so and names CALL llm_train_run, which trains without one."""
    alice = roles["alice"]
    as_role(conn, alice, "SELECT llm_model_init('loop_m', 'adm', seed => 3)")
    with pytest.raises(psycopg.errors.RaiseException, match="cannot open the loopback connection") as e:
        as_role(conn, alice, f"SELECT llm_train('loop_m', 2, {STEP})")
    assert "CALL llm_train_run" in (e.value.diag.message_hint or "")
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'loop_m'").fetchone()[0] == 0
    as_role(conn, alice, f"CALL llm_train_run('loop_m', 2, {STEP})")
    assert conn.execute("SELECT step FROM llm_model WHERE name = 'loop_m'").fetchone()[0] == 2
    as_role(conn, alice, "SELECT llm_model_drop('loop_m')")


def test_bpe_cache_is_filled_only_with_what_the_tokenizer_computes(conn: psycopg.Connection,
                                                                  roles: dict[str, str]) -> None:
    from helpers import tiktoken_gpt2

    text = "Qwertzuiop asdfghjkl, cached by a reader"
    got = as_role(conn, roles["reader"], "SELECT llm_encode(%s)", text)[0][0]
    assert got == tiktoken_gpt2().encode(text, allowed_special="all")
    assert conn.execute("SELECT count(*) FROM llm_bpe_cache WHERE piece = ' asdfghjkl'").fetchone()[0] == 1


def test_every_relation_has_its_privileges(conn: psycopg.Connection) -> None:
    from pg_llm.api.privileges import TABLES

    rels = {r[0] for r in conn.execute("""
        SELECT c.oid::regclass::text FROM pg_class AS c
        WHERE c.relnamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace) AND c.relname LIKE 'llm%'
          AND c.relkind IN ('r', 'p', 'v', 'u') AND NOT c.relispartition""")}
    assert rels == set(TABLES)


def test_a_trainer_imports_and_loads_with_the_client(conn: psycopg.Connection, roles: dict[str, str],
                                                     tmp_path: Path) -> None:
    """pg-llm model import and corpus load as a trainer: COPY FROM refuses tables under row-level security, so
    the loaders copy into a temporary table first; weights equal the superuser's import of the same files."""
    from pg_llm.loader.corpus import CorpusError, load_corpus

    (tmp_path / "c.txt").write_text("Words a trainer loads into a dataset of its own, then trains on.")
    conn.execute(f"SET ROLE {roles['alice']}")
    try:
        import_tiny(conn, tmp_path, "alice_import")  # the same seed as 'adm'
        load_corpus(conn, "alice_corpus", [str(tmp_path / "c.txt")], block_size=4)
        with pytest.raises(psycopg.errors.Error, match='model "adm" belongs to role'):
            import_tiny(conn, tmp_path / "again", "adm")  # --replace: drop it first, which is its owner's
        with pytest.raises(CorpusError, match="belongs to role"):
            load_corpus(conn, "ds", [str(tmp_path / "c.txt")], block_size=4, replace=True)
    finally:
        conn.execute("RESET ROLE")
    assert same(snapshot(conn, "alice_import", ("param",)), snapshot(conn, "adm", ("param",)))
    assert conn.execute("SELECT owner::text FROM llm_dataset_source WHERE dataset = 'alice_corpus'"
                        ).fetchone()[0] == roles["alice"]
    as_role(conn, roles["alice"], "SELECT llm_model_drop('alice_import')")
    as_role(conn, roles["alice"], "SELECT llm_dataset_drop('alice_corpus')")
