"""The docs README links run as written: every ```sql and ```sh block of them, in order, on a fresh database
per document (```text blocks are synopses, ```python snippets of code). Numbers shrink (SHRINK) so that the
blocks run in the default suite; what a block shows is checked where it is exact: `-- {ids}` comments,
ERROR / HINT lines after a statement, psql tables. README's own blocks: tests/test_readme.py."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from pg_llm.assets import gpt2_dir

from conftest import Server

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "pg-llm")
DOCS = ["training.md", "tokenizer.md", "sql-api.md", "access.md", "architecture.md"]
LANGS = {"sql", "sh", "text", "python"}
KEYWORDS = ("SELECT", "INSERT", "CALL", "CREATE", "UPDATE", "DELETE", "SET", "RESET", "GRANT", "REVOKE", "DROP")
TINY = "n_layer = 1, n_head = 2, n_embd = 32, n_ctx = 64"
SHRINK = {"training.md": [("'tiny-bard', 2, 4, 64, 64,", "'tiny-bard', 1, 2, 32, 64,"), ("150,", "3,"),
                          ("batch_size => 8", "batch_size => 2"), ("eval_every => 50", "eval_every => 1"),
                          ("eval_rows => 32", "eval_rows => 4"), ("'val', 32", "'val', 4")]}
# a document that continues README's walkthrough starts where it left off: model 'bard'
PRELUDE = {"architecture.md": ["UPDATE llm_model_config SET " + TINY + " WHERE name = 'gpt2-small'",
                               "SELECT llm_model_init('bard', 'gpt2-small', seed => 1)"]}


@dataclass
class Statement:
    sql: str
    note: str = ""  # the trailing `-- ...` comment of its last line
    output: list[str] = field(default_factory=list)  # what the doc shows after it (ERROR/HINT lines, a table)


def blocks(path: Path) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    lang: str | None = None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip()
                out.append((lang, []))
            else:
                lang = None
        elif lang is not None:
            out[-1][1].append(line)
    return out


def statements(lines: list[str]) -> list[Statement | str]:
    """SQL statements (possibly several lines) and `-- as ROLE:` switches, with the output shown after each."""
    out: list[Statement | str] = []
    open_sql: list[str] = []
    for line in lines:
        if open_sql or line.startswith(KEYWORDS):
            code, _, note = line.partition("--") if "--" in line and "'--" not in line else (line, "", "")
            open_sql.append(code.rstrip())
            if code.rstrip().endswith(";"):
                out.append(Statement("\n".join(open_sql), note.strip()))
                open_sql = []
        elif m := re.match(r"-- as (\w+):", line):
            out.append(m.group(1))
        elif not line.startswith("--") and line.strip() and out and isinstance(out[-1], Statement):
            out[-1].output.append(line)
    assert not open_sql, f"unterminated statement: {open_sql}"
    return out


def check_output(st: Statement, cur: psycopg.Cursor | None, err: psycopg.Error | None) -> None:
    shown = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in st.output if re.match(r"[A-Z]+:", ln)}
    if "ERROR" in shown:
        assert err is not None, f"{st.sql}: the doc shows an error, it ran"
        assert err.diag.message_primary == shown["ERROR"], st.sql
        assert shown.get("HINT") in (None, err.diag.message_hint), st.sql
        return
    assert err is None, f"{st.sql}: {err}"
    assert cur is not None
    rows = cur.fetchall() if cur.description else []
    if st.note.startswith("{"):
        assert "{" + ",".join(map(str, rows[0][0])) + "}" == st.note.split()[0], st.sql
    table = [ln for ln in st.output if not set(ln.strip()) <= set("-+")]
    if table and cur.description:
        # psql's rendering: the values as the server sends them (text), between " | "
        res = cur.pgresult
        assert res is not None
        got = [" | ".join((res.get_value(i, j) or b"").decode() for j in range(res.nfields))
               for i in range(res.ntuples)]
        norm = [re.sub(r"\s*\|\s*", " | ", ln.strip()) for ln in table]
        assert norm[0] == " | ".join(c.name for c in cur.description), st.sql
        assert len(got) == len(norm) - 1, st.sql
        for want, have in zip(norm[1:], got, strict=True):
            have = re.sub(r"\s*\|\s*", " | ", have.strip())
            assert want.replace("\ufffd", "") == have.replace("\ufffd", ""), (st.sql, have)


def run_sh(text: str, dsn: str) -> None:
    for cmd in text.split("&&"):
        args = shlex.split(cmd.split("#", 1)[0])
        if not args:
            continue
        assert args[0] == "pg-llm", f"a ```sh block runs pg-llm commands only: {cmd}"
        args = args[1:] + (["--dsn", dsn] if args[1:3] != ["corpus", "fetch"] else [])
        p = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, (cmd, p.stderr)


def test_every_fenced_block_says_what_it_is() -> None:
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for lang, lines in blocks(path):
            assert lang in LANGS, f"{path.name}: a ``` block without sql/sh/text/python: {lines[:1]}"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_blocks_run_as_written(server: Server, doc: str) -> None:
    runnable = [(lang, lines) for lang, lines in blocks(ROOT / "docs" / doc) if lang in ("sql", "sh")]
    assert runnable, f"{doc}: no ```sql or ```sh block"
    dsn = server.fresh_db("t_docs_" + doc.removesuffix(".md").replace("-", "_"))
    subprocess.run([CLI, "tokenizer", "import", "--dsn", dsn, "--name", "gpt2", str(gpt2_dir() / "encoder.json"),
                    str(gpt2_dir() / "vocab.bpe")], check=True, capture_output=True)
    tag = uuid.uuid4().hex[:6]
    roles: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in PRELUDE.get(doc, []):
            conn.execute(sql)
        try:
            for lang, lines in runnable:
                text = "\n".join(lines)
                for a, b in SHRINK.get(doc, []):
                    text = text.replace(a, b)
                # roles are cluster-wide: the doc's names get a suffix of this run
                for role in re.findall(r"CREATE ROLE (\w+)", text):
                    text = re.sub(rf"\b{role}\b", f"{role}_{tag}", text)
                if lang == "sh":
                    run_sh("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")).replace("\n", "&&"),
                           dsn)
                    continue
                for st in statements(text.splitlines()):
                    if isinstance(st, str):
                        conn.execute(f'SET ROLE "{st}"')
                        continue
                    if st.sql.startswith("CREATE ROLE"):
                        roles.append(st.sql.split()[2])
                    cur, err = None, None
                    try:
                        cur = conn.execute(st.sql.replace("'...'", "NULL"))  # a password placeholder
                    except psycopg.Error as e:
                        err = e
                    check_output(st, cur, err)
        finally:
            conn.execute("RESET ROLE")
            for role in roles:
                conn.execute(f"DROP OWNED BY {role}")
                conn.execute(f"DROP ROLE {role}")
