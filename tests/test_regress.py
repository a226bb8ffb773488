"""pg_regress (test/sql, test/expected: `make installcheck`) on the suite's server, and the tiny model's
expected logits checked against the numpy GPT-2 reference (they are a checksum, not a guess)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import psycopg

from pg_llm.config import GPT2Config
from pg_llm.harness import regress
from pg_llm.loader.tensors import read_tensor
from pg_llm.reference import numpy_gpt2


def test_pg_regress(dsn: str, tmp_path: Path) -> None:
    regress.prepare(dsn, extension=False)  # installed from install.sql by the dsn fixture
    p = regress.run(dsn, tmp_path)
    assert p.returncode == 0, regress.report(p, tmp_path)
    assert f"All {len(regress.tests())} tests passed" in p.stdout, p.stdout


def test_tiny_model_expected_logits_match_the_reference(dsn: str) -> None:
    out = (regress.TEST_DIR / "expected" / "tiny_model.out").read_text()
    n, total, l2 = re.search(r"\n\s*(\d+) \|\s*(-?[\d.]+) \|\s*([\d.]+)\n\(1 row\)", out).groups()
    loss = float(re.search(r"loss\s*\n-+\n\s*([\d.]+)", out).group(1))
    with psycopg.connect(dsn, autocommit=True) as conn:  # the model test_pg_regress's tiny_model.sql made
        cfg = GPT2Config(**dict(zip(("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"), conn.execute(
            "SELECT c.n_layer, c.n_head, c.n_embd, c.n_ctx, c.vocab_size FROM llm_model_config AS c "
            "WHERE c.name = 'regress-tiny'").fetchone(), strict=True)))
        params = {name: read_tensor(conn, i) for name, i in conn.execute(
            "SELECT name, id FROM llm_tensor WHERE model = 'tiny' AND role = 'param'").fetchall()}
    logits, _ = numpy_gpt2.forward(params, np.array([[1, 2, 3, 250]]), cfg, dtype=np.float64)
    last = logits[0, -1]
    assert (last.size, round(float(last.sum()), 3), round(float(np.sqrt((last ** 2).sum())), 3)) == \
        (int(n), float(total), float(l2))
    _, ref_loss = numpy_gpt2.forward(params, np.array([[1, 2, 3, 4]]), cfg, np.array([[2, 3, 4, 5]]),
                                     dtype=np.float64)
    assert round(ref_loss, 4) == loss
