"""The op registry: each differentiable op declares its record, wrapper and backward rule once (OP in its module);
the tape wrappers and llm_backward's dispatch are generated from it and name no op themselves."""
from __future__ import annotations

from pathlib import Path

import pytest

from pg_llm.autograd import backward, registry
from pg_llm.autograd.registry import Op

ROOT = Path(__file__).resolve().parent.parent


def test_every_recorded_op_has_one_rule() -> None:
    names = [o.name for o in registry.ops()]
    assert names == sorted({"add", "add_bias", "attention", "dropout", "embedding", "gelu", "gpt2_block", "gpt2_embed",
                            "layernorm", "linear", "matmul"})
    walk = backward.walk()
    assert all(walk.count(f"r.op = '{n}'") == 1 for n in names)
    tape_sql = (ROOT / "sql" / "autograd" / "tape.sql").read_text() + (ROOT / "sql" / "kernels").joinpath(
        "linear.sql").read_text() + (ROOT / "sql" / "kernels" / "dropout.sql").read_text()
    for n in names:  # every op has a recording wrapper: generated, or its module's own
        assert f"FUNCTION llm_internal.llm_t_{n}(" in tape_sql, n


def test_autograd_modules_name_no_op() -> None:
    for f in ("tape.py", "backward.py"):
        text = (ROOT / "py" / "autograd" / f).read_text()
        for o in registry.ops():
            assert f"'{o.name}'" not in text and f'"{o.name}"' not in text, (f, o.name)


def test_a_rule_binds_named_inputs_and_arguments() -> None:
    op = Op("scale_by", ("x",), args=(("alpha", "FLOAT8"), ("ids", "INT[]")), wrapper="p_x BIGINT, p_alpha FLOAT8",
            kernel="llm_scale(p_x, p_alpha)", backward="acc({x}, llm_scale({g}, {alpha}));\nPERFORM f({ids});")
    assert op.rule() == ("PERFORM llm_grad_acc(p_tape, r.a, llm_scale(g, (r.args ->> 'alpha')::FLOAT8));\n"
                         "PERFORM f(ARRAY(SELECT jsonb_array_elements_text(r.args -> 'ids'))::INT[]);")
    assert op.record("v") == ("llm_tape_record(p_tape, 'scale_by', v, p_x, "
                              "p_args => jsonb_build_object('alpha', p_alpha, 'ids', p_ids))")
    with pytest.raises(KeyError, match="names {y}"):
        Op("bad", ("x",), backward="acc({y}, {g});").rule()
    with pytest.raises(ValueError, match="not 'g'"):
        Op("bad", ("g",), backward="")
