"""Backward: walk a tape in reverse and run each op's backward rule, accumulating gradients per tensor in
llm_tape_grad. The rules come from the op registry (py/autograd/registry.py: the OP of each op module), so
this module names no op; each rule calls the op's backward kernels (the functions its tests check), writes a
fresh tensor and hands it to llm_grad_acc, which registers it as the tensor's gradient or adds it into the
existing one. The embedding backward adds straight into an owned gradient (it touches only the rows of the
ids), which is how the tied wte gets both of its gradients. Gradients held in memory (ops/held.py) are added
there.
"""
from __future__ import annotations

import textwrap

from pg_llm.autograd.registry import ops
from pg_llm.gen.emit import comment, function, plpgsql
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "autograd/backward.sql"
ORDER = 55


def _acc() -> str:
    body = plpgsql("r llm_tape_grad; v_new BIGINT;", """
        SELECT * INTO r FROM llm_tape_grad WHERE tape = p_tape AND tensor = p_tensor;
        IF NOT FOUND THEN
          INSERT INTO llm_tape_grad (tape, tensor, grad, owned) VALUES (p_tape, p_tensor, p_grad, p_owned);
        ELSIF llm_mk_held_add(r.grad, p_grad) THEN  -- both held in memory (ops/held.py): added there
          RETURN;
        ELSIF r.owned THEN
          PERFORM llm_held_write(r.grad), llm_held_write(p_grad);  -- one of them held: tiles for the SQL path
          PERFORM llm_scale(p_grad, 1.0, r.grad, TRUE);
        ELSE
          PERFORM llm_held_write(r.grad), llm_held_write(p_grad);
          v_new := llm_add(r.grad, p_grad);
          UPDATE llm_tape_grad SET grad = v_new, owned = TRUE WHERE tape = p_tape AND tensor = p_tensor;
        END IF;
    """)
    out = [function("llm_grad_acc", "p_tape BIGINT, p_tensor BIGINT, p_grad BIGINT, p_owned BOOLEAN DEFAULT TRUE",
                    "VOID", body, settings=KERNEL_SETTINGS,
                    note="Add p_grad into the gradient of p_tensor on a tape (register it when it is the first).")]
    out.append(function("llm_grad_of", "p_tape BIGINT, p_tensor BIGINT", "BIGINT", """
        SELECT grad FROM llm_tape_grad WHERE tape = p_tape AND tensor = p_tensor""",
                        language="sql", volatility="STABLE", note="Gradient tensor of p_tensor on a tape, or NULL."))
    out.append(function("llm_tensor_like", "p_id BIGINT, p_name TEXT, p_role TEXT DEFAULT 'grad'", "BIGINT", """
        SELECT llm_tensor_create(p_name, v.shape, v.tile, p_role, v.model) FROM llm_tensor AS v WHERE v.id = p_id""",
                        language="sql", note="An empty tensor with the shape and tiling of p_id."))
    return "\n".join(out)


def walk() -> str:
    """The dispatch on r.op: one branch per registered op, its backward rule bound to the tape row r."""
    branches = [f"{'IF' if k == 0 else 'ELSIF'} r.op = '{o.name}' THEN  -- {o.note}\n"
                + textwrap.indent(o.rule(), "  ") for k, o in enumerate(ops())]
    return "\n".join(branches) + """
ELSE
  RAISE EXCEPTION 'pg_llm: backward: no backward rule for op "%" (tape %, seq %)', r.op, p_tape, r.seq
    USING HINT = 'An op recorded on a tape registers its backward in its module (OP = Op(...)).';
END IF;"""


def _backward() -> str:
    body = plpgsql("r llm_tape; g BIGINT; da BIGINT; db BIGINT; dw BIGINT; dx BIGINT;", """
        PERFORM llm_grad_acc(p_tape, p_root, p_root_grad);
        FOR r IN SELECT * FROM llm_tape WHERE tape = p_tape AND seq > p_after ORDER BY seq DESC LOOP
          g := llm_grad_of(p_tape, r.out);
          CONTINUE WHEN g IS NULL;  -- this output does not reach the loss
""" + textwrap.indent(walk(), " " * 10) + """
        END LOOP;
    """)
    return function("llm_backward", "p_tape BIGINT, p_root BIGINT, p_root_grad BIGINT, p_after BIGINT DEFAULT 0",
                    "VOID", body, settings=KERNEL_SETTINGS,
                    note="""Backpropagate p_root_grad (dL/d p_root) through the tape rows recorded after seq
                    p_after, in reverse; gradients land in llm_tape_grad (parameters' included).""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _acc(), _backward()])
