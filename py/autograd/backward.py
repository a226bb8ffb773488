"""Backward: walk a tape in reverse and run each op's backward kernel, accumulating gradients per tensor in
llm_tape_grad. Every backward kernel writes a fresh tensor which llm_grad_acc either registers as the
tensor's gradient or adds into the existing one; the embedding backward adds straight into an owned
gradient (it touches only the rows of the ids), which is how the tied wte gets both of its gradients.

op          forward                       backward (g = dL/d out)
embedding   out = w[ids]                  dw[ids] += g            (scatter-add)
add         out = a + b                   da += g, db += g        (g shared, copied on write)
add_bias    out = x + b                   dx += g, db += sum_rows(g)
matmul      out = a @ op(b)               da += g @ op(b)^T, db += a^T @ g  (tb: db += g^T @ a)
linear      out = a @ b + c               da += g @ b^T, db += a^T @ g, dc += sum_rows(g)  (c may be NULL)
layernorm   out = ln(x; g, b)             dx, dg, db
gelu        out = gelu(x)                 dx += g * gelu'(x)
attention   out = attn(qkv)               dqkv (probabilities and dropout mask recomputed)
dropout     out = x * mask / (1 - p)      dx += g * mask / (1 - p)  (mask redrawn from the seed)
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "autograd/backward.sql"
ORDER = 55


def _acc() -> str:
    body = plpgsql("r llm_tape_grad; v_new BIGINT;", """
        SELECT * INTO r FROM llm_tape_grad WHERE tape = p_tape AND tensor = p_tensor;
        IF NOT FOUND THEN
          INSERT INTO llm_tape_grad (tape, tensor, grad, owned) VALUES (p_tape, p_tensor, p_grad, p_owned);
        ELSIF r.owned THEN
          PERFORM llm_scale(p_grad, 1.0, r.grad, TRUE);
        ELSE
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


WALK = """
    IF r.op = 'add' THEN
      PERFORM llm_grad_acc(p_tape, r.a, g, FALSE);
      PERFORM llm_grad_acc(p_tape, r.b, g, FALSE);
    ELSIF r.op = 'add_bias' THEN
      PERFORM llm_grad_acc(p_tape, r.a, g, FALSE);
      PERFORM llm_grad_acc(p_tape, r.b, llm_sum_rows(g));
    ELSIF r.op = 'matmul' THEN
      IF r.iarg[1] = 1 THEN
        RAISE EXCEPTION 'pg_llm: backward: matmul with a transposed first operand is not recorded by any forward';
      END IF;
      IF r.iarg[2] = 1 THEN  -- out = a @ b^T
        PERFORM llm_grad_acc(p_tape, r.a, llm_matmul(g, r.b));
        PERFORM llm_grad_acc(p_tape, r.b, llm_matmul(g, r.a, NULL, TRUE, FALSE));
      ELSE                   -- out = a @ b
        PERFORM llm_grad_acc(p_tape, r.a, llm_matmul(g, r.b, NULL, FALSE, TRUE));
        PERFORM llm_grad_acc(p_tape, r.b, llm_matmul(r.a, g, NULL, TRUE, FALSE));
      END IF;
    ELSIF r.op = 'linear' THEN  -- fused Conv1D: out = a @ b + c
      PERFORM llm_grad_acc(p_tape, r.a, llm_matmul(g, r.b, NULL, FALSE, TRUE));
      PERFORM llm_grad_acc(p_tape, r.b, llm_matmul(r.a, g, NULL, TRUE, FALSE));
      IF r.c IS NOT NULL THEN
        PERFORM llm_grad_acc(p_tape, r.c, llm_sum_rows(g));
      END IF;
    ELSIF r.op = 'layernorm' THEN
      dx := llm_tensor_like(r.a, 'dx');
      dg := llm_tensor_like(r.b, 'dg');
      db := llm_tensor_like(r.c, 'db');
      PERFORM llm_layernorm_backward(r.a, r.b, g, dx, dg, db, FALSE, r.farg[1]);
      PERFORM llm_grad_acc(p_tape, r.a, dx);
      PERFORM llm_grad_acc(p_tape, r.b, dg);
      PERFORM llm_grad_acc(p_tape, r.c, db);
    ELSIF r.op = 'gelu' THEN
      PERFORM llm_grad_acc(p_tape, r.a, llm_gelu_backward(r.a, g, NULL, FALSE));
    ELSIF r.op = 'attention' THEN
      PERFORM llm_grad_acc(p_tape, r.a, llm_attention_backward(r.a, g, r.iarg[1], r.iarg[2], NULL, FALSE,
                                                               r.farg[1], r.seed));
    ELSIF r.op = 'dropout' THEN
      PERFORM llm_grad_acc(p_tape, r.a, llm_dropout_backward(g, r.farg[1], r.seed, NULL, FALSE));
    ELSIF r.op = 'embedding' THEN
      dw := llm_grad_of(p_tape, r.a);
      IF dw IS NULL OR NOT (SELECT owned FROM llm_tape_grad WHERE tape = p_tape AND tensor = r.a) THEN
        dx := llm_tensor_like(r.a, 'dw');
        PERFORM llm_embedding_backward(g, r.ids, dx, FALSE);
        PERFORM llm_grad_acc(p_tape, r.a, dx);
      ELSE
        PERFORM llm_embedding_backward(g, r.ids, dw, TRUE);
      END IF;
    ELSE
      RAISE EXCEPTION 'pg_llm: backward: no backward rule for op "%" (tape %, seq %)', r.op, p_tape, r.seq;
    END IF;
"""


def _backward() -> str:
    body = plpgsql("r llm_tape; g BIGINT; dx BIGINT; dg BIGINT; db BIGINT; dw BIGINT;", """
        PERFORM llm_grad_acc(p_tape, p_root, p_root_grad);
        FOR r IN SELECT * FROM llm_tape WHERE tape = p_tape AND seq > p_after ORDER BY seq DESC LOOP
          g := llm_grad_of(p_tape, r.out);
          CONTINUE WHEN g IS NULL;  -- this output does not reach the loss
    """ + "\n".join("  " + line for line in WALK.strip("\n").splitlines()) + """
        END LOOP;
    """)
    return function("llm_backward", "p_tape BIGINT, p_root BIGINT, p_root_grad BIGINT, p_after BIGINT DEFAULT 0",
                    "VOID", body, settings=KERNEL_SETTINGS,
                    note="""Backpropagate p_root_grad (dL/d p_root) through the tape rows recorded after seq
                    p_after, in reverse; gradients land in llm_tape_grad (parameters' included).""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _acc(), _backward()])
