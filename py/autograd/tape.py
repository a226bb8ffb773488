"""Autograd tape: a training forward records every op (inputs, output, named arguments) in llm_tape; backward
(py/autograd/backward.py) walks it in reverse. The recording wrappers llm_t_<op>(p_tape, ...) run the kernel
and, when p_tape is not NULL, append a tape row, so inference and training share one forward (llm_gpt2_forward).
They are generated from the op registry (py/autograd/registry.py: each op module's OP); an op whose recording
is special writes its own (llm_t_dropout in ops/dropout.py, llm_t_linear in ops/linear.py). Float arguments
go into the JSON record with extra_float_digits = 1: their shortest exact form, so backward reads them bit for
bit.

Tape rows and gradients of a step are scratch: UNLOGGED tables and scratch tensors, dropped when the step ends.
"""
from __future__ import annotations

from pg_llm.autograd.registry import ops
from pg_llm.gen.emit import comment, function, stmt
from pg_llm.gen.surface import INTERNAL

SQL_FILE = "autograd/tape.sql"
ORDER = 50


def _tables() -> str:
    return "\n".join([
        stmt(f"""
            CREATE UNLOGGED TABLE {INTERNAL}.llm_tape (
              tape BIGINT NOT NULL,
              seq BIGINT NOT NULL,
              op TEXT NOT NULL,
              a BIGINT,
              b BIGINT,
              c BIGINT,
              out BIGINT NOT NULL,
              args JSONB,
              PRIMARY KEY (tape, seq)
            )""", "One row per recorded op of a training forward: out = op(a, b, c; args). Which input is a, b, c\n"
                  "and which arguments args names: the op's registration (py/autograd/registry.py)."),
        stmt(f"CREATE SEQUENCE {INTERNAL}.llm_tape_seq", "Tape order (backward walks seq descending)."),
        stmt(f"""
            CREATE UNLOGGED TABLE {INTERNAL}.llm_tape_grad (
              tape BIGINT NOT NULL,
              tensor BIGINT NOT NULL,
              grad BIGINT NOT NULL,
              owned BOOLEAN NOT NULL,
              PRIMARY KEY (tape, tensor)
            )""", "Gradient of each tensor of a tape. owned = false when the grad tensor is shared (e.g. both\n"
                  "inputs of an add get dy itself): accumulating into it then copies first."),
    ]) + "\n"


def _record() -> str:
    body = """
        INSERT INTO llm_tape (tape, seq, op, a, b, c, out, args)
        SELECT p_tape, nextval('llm_tape_seq'), p_op, p_a, p_b, p_c, p_out, p_args
        WHERE p_tape IS NOT NULL;
        SELECT p_out"""
    return function("llm_tape_record",
                    "p_tape BIGINT, p_op TEXT, p_out BIGINT, p_a BIGINT, p_b BIGINT DEFAULT NULL, "
                    "p_c BIGINT DEFAULT NULL, p_args JSONB DEFAULT NULL", "BIGINT", body, language="sql",
                    note="Append an op to a tape (no-op when p_tape is NULL); returns p_out.")


def _wrappers() -> str:
    out = []
    for op in ops():
        if op.wrapper is None:  # the op module writes its own (dropout: rate 0 records nothing; linear: fusions)
            continue
        out.append(function(f"llm_t_{op.name}", f"p_tape BIGINT, {op.wrapper}", "BIGINT",
                            f"SELECT {op.record(op.kernel)}", language="sql", settings=("extra_float_digits = 1",),
                            note=f"Recording wrapper: {op.name} forward, appended to the tape when p_tape is set."))
    out.append(function("llm_site_seed", "p_seed BIGINT, p_site TEXT", "BIGINT", """
        SELECT ('x' || substr(md5(p_seed::TEXT || ':' || p_site), 1, 15))::BIT(60)::BIGINT""",
                        language="sql", volatility="IMMUTABLE", strict=True,
                        note="A non-negative 60-bit seed for one dropout site (e.g. 'h.3.attn') of a step's seed."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), _record(), _wrappers()])
