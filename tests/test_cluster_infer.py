"""Inference fan-out (py/api/cluster_infer.py, docs/scaleout.md) over databases of the test server: a tiny GPT-2
(GPT-2 vocabulary and tokenizer, on the coordinator only) synced to 2 and 3 ranks. llm_cluster_generate and
llm_cluster_perplexity equal llm_generate / llm_perplexity on the coordinator (greedy and seeded sampling),
are routed by key to one rank, stably and like PL/Proxy's RUN ON hashtext(key); llm_cluster_perplexity_texts
gives every rank a share and equals llm_perplexity_texts row for row; a rank without the model, at another
step or with a changed tile is refused before anything runs (probes count the rank-side calls), the cached
check notices changes on either side; rank errors come back as the single-node errors; a reader role calls the
public functions with its own user mapping and cannot forge another role's check."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import psycopg
import pytest
from psycopg import sql

from pg_llm.loader.tokenizer import ensure_gpt2

from conftest import Server
from gpt2_fixtures import import_tiny
from helpers import made_roles

RANKS = ("t_ci_r0", "t_ci_r1", "t_ci_r2")
LONG = ("Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to take arms "
        "against a sea of troubles and by opposing end them. To die, to sleep, no more.")  # > n_ctx (37) tokens
TEXTS = ["To be, or not to be, that is the question:", "Hi", None, LONG, "", "Ay, there's the rub.",
         "For in that sleep of death what dreams may come"]  # 7 texts: not a multiple of 2 or 3
GEN_TYPES = "int[], text, int, int[], int, float8, int, float8, bigint, boolean, boolean"
GEN_ARGS = ("p_ranks INT[], p_model TEXT, p_eos_id INT, p_tokens INT[], p_max_new_tokens INT, p_temperature FLOAT8, "
            "p_top_k INT, p_top_p FLOAT8, p_seed BIGINT, p_eos BOOLEAN, p_use_cache BOOLEAN")
LISTS_TYPES = "int[], int[], text, text[], int"
SLEEP = 0.5
MARK = {"!": 0, '"': 1, "#": 2}  # the probe answers with token id = its rank: decoded '!', '"', '#'


@dataclass
class Nodes:
    """The coordinator's connection and the ranks' DSNs."""
    coord: psycopg.Connection
    ranks: list[str]

    def on_rank(self, r: int, query: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.ranks[r], autocommit=True) as c:
            cur = c.execute(query, args or None)
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def nodes(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """The coordinator (model 'm', GPT-2 tokenizer) and clusters 'three' (3 ranks) and 'two' (the first 2)."""
    dsn = server.fresh_db("t_ci_coord")
    ranks = [server.fresh_db(r) for r in RANKS]
    info = psycopg.conninfo.conninfo_to_dict(server.admin_dsn)
    where = (info.get("host", "127.0.0.1"), int(info["port"]))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION plproxy")
        conn.execute("CREATE EXTENSION postgres_fdw")
        ensure_gpt2(conn)
        import_tiny(conn, tmp_path_factory.mktemp("ci"), "m", seed=1, vocab_size=50257, initializer_range=0.4)
        for cluster, names in (("three", RANKS), ("two", RANKS[:2])):
            for r in names:
                conn.execute("SELECT llm_cluster_add(%s, %s, %s, %s)", (cluster, *where, r))
        conn.execute("SELECT * FROM llm_cluster_sync('m', 'three')")
        yield Nodes(conn, ranks)


@contextmanager
def probes(nodes: Nodes) -> Iterator[None]:
    """On every rank, the rank-side functions of llm_cluster_generate and llm_cluster_perplexity_texts replaced
    by probes that count their calls (a sequence: not rolled back) and answer with the number of the rank that
    ran them (its database's, not the number it was sent): generate returns token id r, texts score r (after
    sleeping SLEEP seconds: parallel ranks sleep at the same time)."""
    saved = {}
    for r in range(len(RANKS)):
        saved[r] = [nodes.on_rank(r, "SELECT pg_get_functiondef(%s::regprocedure)", f"llm_internal.{f}")[0][0]
                    for f in (f"llm_cluster_rank_generate({GEN_TYPES})",
                              f"llm_cluster_rank_perplexity_lists({LISTS_TYPES})")]
        nodes.on_rank(r, "CREATE SEQUENCE llm_internal.t_probe")
        nodes.on_rank(r, f"""CREATE OR REPLACE FUNCTION llm_internal.llm_cluster_rank_generate({GEN_ARGS})
            RETURNS TABLE(rank INT, tokens INT[]) LANGUAGE sql
            AS $$ SELECT {r}, ARRAY[{r}] FROM (SELECT nextval('llm_internal.t_probe')) AS x $$""")
        nodes.on_rank(r, f"""CREATE OR REPLACE FUNCTION llm_internal.llm_cluster_rank_perplexity_lists(
              p_ranks INT[], p_ords INT[], p_model TEXT, p_lists TEXT[], p_stride INT)
            RETURNS TABLE(rank INT, ord INT, perplexity FLOAT8, tokens_scored BIGINT, mean_loss FLOAT8) LANGUAGE sql
            AS $$ SELECT {r}, u.o, {r}::FLOAT8, cardinality(u.l::INT[])::BIGINT, NULL::FLOAT8
                  FROM unnest(p_ords, p_lists) AS u(o, l)
                  CROSS JOIN (SELECT nextval('llm_internal.t_probe'), pg_sleep({SLEEP})) AS x $$""")
    try:
        yield
    finally:
        for r, defs in saved.items():
            for d in defs:
                nodes.on_rank(r, d)
            nodes.on_rank(r, "DROP SEQUENCE llm_internal.t_probe")


def probe_calls(nodes: Nodes) -> int:
    return sum(nodes.on_rank(r, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM llm_internal.t_probe"
                       )[0][0] for r in range(len(RANKS)))


def scores(conn: psycopg.Connection, query: str, *args: object) -> list[tuple]:
    return conn.execute(f"SELECT ord, perplexity, tokens_scored, mean_loss FROM {query}", args).fetchall()


def same_scores(got: list[tuple], want: list[tuple]) -> None:
    """The single-node mean loss within 1e-6 relative, as test_perplexity's texts form against one text at a time:
    a rank packs its share of the texts into other forwards than one node packs all of them, and OpenBLAS may
    round a row of a product differently with the matrix's height (equal on SkylakeX kernels, 1e-8 apart on
    Haswell kernels, 2026-12-03)."""
    assert [g[0] for g in got] == [w[0] for w in want] and [g[2] for g in got] == [w[2] for w in want]
    for g, w in zip(got, want, strict=True):
        if w[3] is None:
            assert g[1] is None and g[3] is None, (g, w)
            continue
        # perplexity = exp(mean loss): the loss's absolute difference is the perplexity's relative one
        assert abs(g[3] - w[3]) <= 1e-6 * w[3] and abs(g[1] - w[1]) <= 1e-6 * w[3] * w[1], (g, w)


@pytest.mark.parametrize("cluster", ["two", "three"])
def test_generate_and_perplexity_equal_one_node(nodes: Nodes, cluster: str) -> None:
    coord = nodes.coord
    for args in ("max_new_tokens => 12, temperature => 0",  # greedy
                 "max_new_tokens => 12, temperature => 0.9, top_k => 40, top_p => 0.95, seed => 7",
                 "max_new_tokens => 5, temperature => 1.0, seed => 3, use_cache => false"):
        want = coord.execute(f"SELECT llm_generate('m', 'To be, or not', {args})").fetchone()[0]
        assert len(want) > 5
        for key in (None, "user-1", "user-2"):
            got = coord.execute(f"SELECT llm_cluster_generate(%s, 'm', 'To be, or not', {args}, key => %s)",
                                (cluster, key)).fetchone()[0]
            assert got == want, (args, key)
    for text, stride in (("To be, or not to be, that is the question", None), (LONG, None), (LONG, 9)):
        want = coord.execute("SELECT * FROM llm_perplexity('m', %s, stride => %s)", (text, stride)).fetchone()
        for key in (None, "k"):
            got = coord.execute("SELECT * FROM llm_cluster_perplexity(%s, 'm', %s, stride => %s, key => %s)",
                                (cluster, text, stride, key)).fetchone()
            assert got == want


@pytest.mark.parametrize("cluster", ["two", "three"])
def test_texts_equal_one_node(nodes: Nodes, cluster: str) -> None:
    coord = nodes.coord
    for stride in (None, 7):
        want = scores(coord, "llm_perplexity_texts('m', %s, stride => %s)", TEXTS, stride)
        assert max(w[2] for w in want) > 37  # a text longer than the context: several windows
        same_scores(scores(coord, "llm_cluster_perplexity_texts(%s, 'm', %s, stride => %s)", cluster, TEXTS, stride),
                    want)
    more = [f"{t} number {i}" for i, t in enumerate(TEXTS * 3) if t]  # 15 scoring texts
    same_scores(scores(coord, "llm_cluster_perplexity_texts(%s, 'm', %s)", cluster, more),
                scores(coord, "llm_perplexity_texts('m', %s)", more))
    assert scores(coord, "llm_cluster_perplexity_texts(%s, 'm', '{}')", cluster) == []
    assert scores(coord, "llm_cluster_perplexity_texts(%s, 'm', ARRAY[NULL, 'a'])", cluster) == [
        (1, None, 0, None), (2, None, 0, None)]  # nothing to score: no rank is called


def test_routing(nodes: Nodes) -> None:
    """A key goes to llm_cluster_route(key) = abs(hashtext(key) % n): the rank PL/Proxy's own RUN ON hashtext(key)
    picks with modular_mapping; the same rank every time, and 30 keys reach every rank. Texts: every rank gets a
    share, balanced by tokens."""
    coord = nodes.coord
    keys = [f"session-{i}" for i in range(30)]
    coord.execute("""CREATE FUNCTION llm_internal.t_by_hash(p_key TEXT) RETURNS SETOF TEXT LANGUAGE plproxy AS $$
        CLUSTER 'llm_cluster_three'; RUN ON hashtext(p_key); SELECT current_database(); $$""")
    try:
        by_plproxy = [coord.execute("SELECT llm_internal.t_by_hash(%s)", (k,)).fetchone()[0] for k in keys]
    finally:
        coord.execute("DROP FUNCTION llm_internal.t_by_hash(TEXT)")
    route = [coord.execute("SELECT llm_cluster_route('three', %s)", (k,)).fetchone()[0] for k in keys]
    assert [RANKS[r] for r in route] == by_plproxy
    assert sorted(set(route)) == [0, 1, 2]
    with probes(nodes):
        for _ in range(2):  # stable
            ran = [MARK[coord.execute("SELECT llm_cluster_generate('three', 'm', 'To be', key => %s)", (k,)
                                      ).fetchone()[0]] for k in keys[:12]]
            assert ran == route[:12]
        anywhere = {MARK[coord.execute("SELECT llm_cluster_generate('three', 'm', 'To be')").fetchone()[0]]
                    for _ in range(20)}
        assert len(anywhere) >= 2  # no key: any rank (random), P(one rank 20 times) = 3^-19
        assert probe_calls(nodes) == 2 * 12 + 20
        for cluster, n in (("two", 2), ("three", 3)):
            t0 = perf_counter()
            rows = scores(coord, "llm_cluster_perplexity_texts(%s, 'm', %s)", cluster, TEXTS)
            assert perf_counter() - t0 < (n - 0.6) * SLEEP  # in parallel: n ranks in less than n - 0.6 sleeps
            tokens = {r: sum(x[2] for x in rows if x[1] == r) for r in range(n)}
            assert all(tokens[r] > 0 for r in range(n)), tokens  # every rank scored a share
            assert [x[0] for x in rows] == list(range(1, 8)) and rows[1][1:] == (None, 0, None)
            assert max(tokens.values()) == tokens[rows[3][1]]  # the long text alone is the biggest share


def refused(nodes: Nodes, match: str, hint: str | None = None) -> None:
    """Every routed call is refused with `match` and nothing ran on any rank."""
    coord = nodes.coord
    before = probe_calls(nodes)
    for q in ("SELECT llm_cluster_generate('three', 'm', 'To be', key => %s)",
              "SELECT * FROM llm_cluster_perplexity('three', 'm', %s)",
              "SELECT * FROM llm_cluster_perplexity_texts('three', 'm', ARRAY[%s, 'To be or not'])"):
        with pytest.raises(psycopg.errors.RaiseException, match=match) as e:
            coord.execute(q, (LONG,))
        if hint:
            assert e.value.diag.message_hint == hint
    assert probe_calls(nodes) == before


def test_refused_before_running(nodes: Nodes) -> None:
    coord = nodes.coord
    sync_hint = "SELECT * FROM llm_cluster_sync('m', 'three') replicates the coordinator's model to every rank."
    checked = "SELECT checked_at FROM llm_internal.llm_cluster_verified WHERE cluster = 'three' AND model = 'm'"
    with probes(nodes):
        coord.execute("SELECT llm_cluster_generate('three', 'm', 'To be')")
        first = coord.execute(checked).fetchone()[0]
        coord.execute("SELECT llm_cluster_generate('three', 'm', 'To be')")
        assert coord.execute(checked).fetchone()[0] == first  # unchanged versions: no full check again
        for q, msg in (("SELECT llm_cluster_generate('nope', 'm', 'x')", 'unknown cluster "nope"'),
                       ("SELECT llm_cluster_generate('three', 'nope', 'x')", 'unknown model "nope"'),
                       ("SELECT * FROM llm_cluster_perplexity_texts('nope', 'm', '{}')", 'unknown cluster "nope"'),
                       ("SELECT llm_cluster_route('nope', 'k')", 'unknown cluster "nope"'),
                       ("SELECT llm_cluster_generate('three', 'm', '')", "llm_cluster_generate: empty prompt"),
                       ("SELECT * FROM llm_cluster_perplexity_texts('three', 'm', NULL)", "texts is NULL"),
                       ("SELECT * FROM llm_cluster_perplexity_texts('three', 'm', '{a}', stride => 99)",
                        r"stride must be in \[1, 37\]")):
            with pytest.raises(psycopg.errors.RaiseException, match=msg):
                coord.execute(q)
        assert probe_calls(nodes) == 1 + 1
        # a rank without the model
        nodes.on_rank(1, "SELECT llm_model_drop('m')")
        refused(nodes, r'rank 1 of cluster "three" \(database "t_ci_r1"\) has no model "m"', sync_hint)
        coord.execute("SELECT * FROM llm_cluster_sync('m', 'three')")
        # a rank at another step; back at the step, the cached check holds again
        nodes.on_rank(2, "UPDATE llm_model SET step = step + 5 WHERE name = 'm'")
        refused(nodes, r'model "m" is at step 5 on rank 2 of cluster "three" \(database "t_ci_r2"\), at step 0 '
                       r'on the coordinator', sync_hint)
        nodes.on_rank(2, "UPDATE llm_model SET step = 0 WHERE name = 'm'")
        assert len(coord.execute("SELECT llm_cluster_generate('three', 'm', 'To be')").fetchone()[0]) > 0
        # a changed tile, same step, on a rank and then on the coordinator: the versions differ from the cached
        # ones, so the full check runs and names the tensor
        bad = ("UPDATE llm_tile SET data = overlay(data PLACING '\\x00000000'::BYTEA FROM 1) WHERE tensor_id = "
               "llm_param('m', 'h.0.attn.c_proj.weight') AND tr = 0 AND tc = 0")
        nodes.on_rank(0, bad)
        refused(nodes, r'the parameters of model "m" diverge on rank 0 of cluster "three" .*h\.0\.attn\.c_proj\.weight')
        coord.execute("SELECT * FROM llm_cluster_sync('m', 'three')")
        coord.execute(bad.replace("'\\x00000000'", "'\\x01000000'"))
        refused(nodes, r'diverge on rank 0 of cluster "three"')
        coord.execute("SELECT * FROM llm_cluster_sync('m', 'three')")
        n = probe_calls(nodes)
        coord.execute("SELECT llm_cluster_generate('three', 'm', 'To be')")
        assert probe_calls(nodes) == n + 1 and coord.execute(checked).fetchone()[0] > first


def test_rank_errors_are_the_single_node_errors(nodes: Nodes) -> None:
    coord = nodes.coord
    for args in ("temperature => -1", "top_p => 0", "max_new_tokens => -3"):
        with pytest.raises(psycopg.Error) as one:
            coord.execute(f"SELECT llm_generate('m', 'To be', {args})")
        with pytest.raises(psycopg.Error) as many:
            coord.execute(f"SELECT llm_cluster_generate('three', 'm', 'To be', {args}, key => 'x')")
        rank = coord.execute("SELECT llm_cluster_route('three', 'x')").fetchone()[0]
        assert many.value.diag.message_primary == one.value.diag.message_primary
        assert many.value.diag.message_hint == one.value.diag.message_hint
        assert many.value.diag.sqlstate == one.value.diag.sqlstate
        assert f'(raised on rank {rank} of cluster "three" (database "{RANKS[rank]}"))' in \
            many.value.diag.message_detail
    with pytest.raises(psycopg.Error, match="stride must be") as e:
        coord.execute("SELECT * FROM llm_cluster_perplexity('three', 'm', 'To be or not', stride => 0)")
    assert "raised on rank" in e.value.diag.message_detail


def test_roles(nodes: Nodes) -> None:
    """A reader with USAGE on the cluster's PL/Proxy server and a user mapping runs the fan-out (the same results),
    trusts only its own checks and cannot write another role's; without a mapping it is told what is missing;
    a role without pg_llm's roles calls nothing."""
    coord = nodes.coord
    want = coord.execute("SELECT llm_generate('m', 'To be', temperature => 0)").fetchone()[0]
    texts = scores(coord, "llm_perplexity_texts('m', %s)", TEXTS)
    with made_roles(coord, {"reader": "LOGIN IN ROLE llm_reader", "nobody": "LOGIN"}) as who:
        reader = sql.Identifier(who["reader"])
        coord.execute(sql.SQL("GRANT USAGE ON FOREIGN SERVER llm_cluster_three TO {}").format(reader))

        def as_reader(q: str, *args: object) -> list[tuple]:
            coord.execute(sql.SQL("SET ROLE {}").format(reader))
            try:
                return coord.execute(q, args).fetchall()
            finally:
                coord.execute("RESET ROLE")

        for _ in range(2):  # every time (PL/Proxy itself checks only a session's first call)
            with pytest.raises(psycopg.errors.RaiseException, match="has no user mapping for foreign server") as e:
                as_reader("SELECT llm_cluster_generate('three', 'm', 'To be')")
            assert "CREATE USER MAPPING FOR" in e.value.diag.message_hint
        coord.execute(sql.SQL("CREATE USER MAPPING FOR {} SERVER llm_cluster_three OPTIONS (user {})").format(
            reader, sql.Literal(who["reader"])))
        try:
            assert as_reader("SELECT llm_cluster_generate('three', 'm', 'To be', temperature => 0, key => 'r')"
                             ) == [(want,)]
            same_scores(as_reader("SELECT ord, perplexity, tokens_scored, mean_loss FROM "
                                  "llm_cluster_perplexity_texts('three', 'm', %s)", TEXTS), texts)
            assert as_reader("SELECT llm_cluster_route('three', 'r')") == coord.execute(
                "SELECT llm_cluster_route('three', 'r')").fetchall()
            owners = "SELECT owner::TEXT, versions FROM llm_internal.llm_cluster_verified WHERE cluster = 'three' " \
                     "ORDER BY 1"
            rows = coord.execute(owners).fetchall()
            assert {r[0] for r in rows} == {coord.info.user, who["reader"]}  # each role its own check
            with pytest.raises(psycopg.Error, match="row-level security"):
                as_reader("INSERT INTO llm_internal.llm_cluster_verified (cluster, model, versions, owner) "
                          "VALUES ('three', 'x', '{}', %s::REGROLE) RETURNING 1", coord.info.user)
            as_reader("UPDATE llm_internal.llm_cluster_verified SET versions = '{}' WHERE owner <> CURRENT_USER::"
                      "TEXT::REGROLE RETURNING 1")
            assert coord.execute(owners).fetchall() == rows  # another role's check: unchanged
        finally:
            coord.execute(sql.SQL("DROP USER MAPPING FOR {} SERVER llm_cluster_three").format(reader))
        coord.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(who["nobody"])))
        try:
            for q in ("SELECT llm_cluster_generate('three', 'm', 'To be')",
                      "SELECT * FROM llm_cluster_perplexity_texts('three', 'm', '{a}')",
                      "SELECT llm_cluster_route('three')"):
                with pytest.raises(psycopg.Error, match="permission denied for function"):
                    coord.execute(q)
            with pytest.raises(psycopg.Error, match="permission denied for schema"):
                coord.execute("SELECT llm_internal.llm_cluster_ready('three', 'm')")
        finally:
            coord.execute("RESET ROLE")


def test_docs_name_the_api() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "scaleout.md").read_text()
    for name in ("llm_cluster_generate", "llm_cluster_perplexity_texts", "llm_cluster_route", "llm_cluster_verified"):
        assert name in doc
