"""README's "A psql walkthrough", run as written on a fresh database: every SQL statement and every
`$ pg-llm ...` command of the block, in order, with tiny numbers (SMALLER shrinks the walkthrough's config,
step counts, batch and block size; TINY GPT-2 small's row, should a statement use it) so it runs in the
default suite. A statement or command the README shows and pg_llm no longer accepts fails here."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import psycopg

from pg_llm.assets import gpt2_dir

from conftest import Server

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "pg-llm")
TINY = "n_layer = 1, n_head = 2, n_embd = 32, n_ctx = 64"
TINY_ROW = "1, 2, 32, 64, 50257"  # the walkthrough's own config, as small
SMALLER = [("'bard', 40,", "'bard', 2,"), ("'bard', 60,", "'bard', 4,"), ("batch_size => 8", "batch_size => 2"),
           ("eval_every => 20", "eval_every => 1"), ("max_new_tokens => 20", "max_new_tokens => 5"),
           ("('bard-mini', 2, 4, 64, 64, 50257)", f"('bard-mini', {TINY_ROW})")]


def walkthrough() -> list[tuple[str, str, str]]:
    """(kind, text, trailing comment) of the README block: kind 'sql' or 'sh'."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## A psql walkthrough", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    out: list[tuple[str, str, str]] = []
    for line in block.splitlines():
        if m := re.match(r"--\s+\$ (pg-llm .*?)(\s{2,}\(.*)?$", line):
            out += [("sh", cmd.strip(), "") for cmd in m.group(1).split("&&")]
        elif line.strip() and not line.startswith("--"):
            sql, _, note = line.partition(";")
            out.append(("sql", sql.strip() + ";", note.strip().removeprefix("--").strip()))
    return out


def shrink(text: str) -> str:
    for a, b in SMALLER:
        text = text.replace(a, b)
    return text


def test_walkthrough_block_is_found() -> None:
    kinds = [k for k, _, _ in walkthrough()]
    assert kinds.count("sql") >= 12 and kinds.count("sh") >= 3


def test_readme_walkthrough_runs_as_written(server: Server, tmp_path: Path) -> None:
    dsn = server.fresh_db("t_readme_walkthrough")
    subprocess.run([CLI, "tokenizer", "import", "--dsn", dsn, "--name", "gpt2", str(gpt2_dir() / "encoder.json"),
                    str(gpt2_dir() / "vocab.bpe")], check=True, capture_output=True)
    ran: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE llm_model_config SET {TINY} WHERE name = 'gpt2-small'")
        for kind, text, note in walkthrough():
            text = shrink(text)
            if kind == "sh":
                if "path/to" in text:
                    continue  # a placeholder for the user's own checkpoint directory
                args = shlex.split(text)[1:]
                args += ["--dsn", dsn] if args[:2] != ["corpus", "fetch"] else []
                args = [str(tmp_path / a) if a.endswith(".png") else a for a in args]
                p = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=ROOT)
                assert p.returncode == 0, (text, p.stderr)
            else:
                cur = conn.execute(text)
                rows = cur.fetchall() if cur.description else []
                if text.startswith("SELECT llm_encode("):
                    assert "{" + ",".join(map(str, rows[0][0])) + "}" == note.split()[0]
                if text.startswith("SELECT llm_decode("):
                    assert rows[0][0] == note
                if text.startswith("SELECT step, loss"):
                    assert [r[0] for r in rows] == [1, 2, 3, 4] and all(r[3] is not None for r in rows[:2])
            ran.append(text)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert sum(t.startswith(("SELECT", "CALL", "INSERT")) for t in ran) == sum(k == "sql" for k, _, _ in walkthrough())


def readme_sh_blocks() -> list[list[str]]:
    """The ```sh blocks of README, as lists of commands (comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    return [[ln.split("  #", 1)[0].strip() for ln in b.split("```", 1)[0].splitlines() if ln.strip()]
            for b in readme.split("```sh\n")[1:]]


def test_readme_dev_cluster_block_runs() -> None:
    """README's `make db` block (its Quick start block, `make setup` and `make test`, is what .ci/run runs): the
    dev cluster starts, psql reaches pg_llm through both spellings of its URL, `make db-stop` stops it. A dev
    cluster that was running before the test is left running (make db-stop runs where it was not: CI)."""
    from pg_llm.harness import devdb

    setup, dev = readme_sh_blocks()[:2]
    assert setup == ["make setup", "make test"]
    assert [c.split()[0] for c in dev] == ["make", "psql", "make"]
    was_running = devdb._cluster().is_running()
    readme = (ROOT / "README.md").read_text()
    other_psql = re.search(r'or: (psql "\$\(.*?\)")', readme)
    assert other_psql, "README names a second way to reach the dev database"
    for cmd in [*dev[:2], other_psql.group(1), *([] if was_running else dev[2:])]:
        stdin = "SELECT llm_encode('Hello world');\n" if cmd.startswith("psql") else None
        p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (cmd, p.stdout, p.stderr)
        if stdin:
            assert "{15496,995}" in p.stdout, (cmd, p.stdout)
    assert devdb._cluster().is_running() == was_running
