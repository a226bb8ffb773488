"""Autograd tape: a training forward records every op (inputs, output, arguments) in llm_tape; backward
(py/autograd/backward.py) walks it in reverse. The recording wrappers llm_t_<op>(p_tape, ...) run the kernel
and, when p_tape is not NULL, append a tape row, so inference and training share one forward (llm_gpt2_forward).

Tape rows and gradients of a step are scratch: UNLOGGED tables and scratch tensors, dropped when the step ends.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.ops.common import KERNEL_SETTINGS

SQL_FILE = "autograd/tape.sql"
ORDER = 50


def _tables() -> str:
    return "\n".join([
        stmt("""
            CREATE UNLOGGED TABLE llm_tape (
              tape BIGINT NOT NULL,
              seq BIGINT NOT NULL,
              op TEXT NOT NULL,
              a BIGINT,
              b BIGINT,
              c BIGINT,
              out BIGINT NOT NULL,
              ids INT[],
              iarg INT[],
              farg FLOAT8[],
              seed BIGINT,
              PRIMARY KEY (tape, seq)
            )""", "One row per recorded op of a training forward: out = op(a, b, c; ids, iarg, farg, seed)."),
        stmt("CREATE SEQUENCE llm_tape_seq", "Tape order (backward walks seq descending)."),
        stmt("""
            CREATE UNLOGGED TABLE llm_tape_grad (
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
        INSERT INTO llm_tape (tape, seq, op, a, b, c, out, ids, iarg, farg, seed)
        SELECT p_tape, nextval('llm_tape_seq'), p_op, p_a, p_b, p_c, p_out, p_ids, p_iarg, p_farg, p_seed
        WHERE p_tape IS NOT NULL;
        SELECT p_out"""
    return function("llm_tape_record",
                    "p_tape BIGINT, p_op TEXT, p_out BIGINT, p_a BIGINT, p_b BIGINT DEFAULT NULL, "
                    "p_c BIGINT DEFAULT NULL, p_ids INT[] DEFAULT NULL, p_iarg INT[] DEFAULT NULL, "
                    "p_farg FLOAT8[] DEFAULT NULL, p_seed BIGINT DEFAULT NULL", "BIGINT", body, language="sql",
                    note="Append an op to a tape (no-op when p_tape is NULL); returns p_out.")


# (name, args after p_tape, kernel call, record call)
WRAPPERS = [
    ("embedding", "p_w BIGINT, p_ids INT[], p_tile_rows INT",
     "llm_embedding(p_w, p_ids, NULL, p_tile_rows)", "p_w, p_ids => p_ids"),
    ("add", "p_a BIGINT, p_b BIGINT", "llm_add(p_a, p_b)", "p_a, p_b"),
    ("add_bias", "p_x BIGINT, p_b BIGINT", "llm_add_bias(p_x, p_b)", "p_x, p_b"),
    ("matmul", "p_a BIGINT, p_b BIGINT, p_ta BOOLEAN DEFAULT FALSE, p_tb BOOLEAN DEFAULT FALSE",
     "llm_matmul(p_a, p_b, NULL, p_ta, p_tb)", "p_a, p_b, p_iarg => ARRAY[p_ta::INT, p_tb::INT]"),
    ("layernorm", "p_x BIGINT, p_g BIGINT, p_b BIGINT, p_eps FLOAT8",
     "llm_layernorm(p_x, p_g, p_b, NULL, p_eps)", "p_x, p_g, p_b, p_farg => ARRAY[p_eps]"),
    ("gelu", "p_x BIGINT", "llm_gelu(p_x)", "p_x"),
    ("attention", "p_qkv BIGINT, p_n_head INT, p_seq_len INT, p_dropout FLOAT8, p_seed BIGINT",
     "llm_attention(p_qkv, p_n_head, p_seq_len, NULL, p_dropout, p_seed)",
     "p_qkv, p_iarg => ARRAY[p_n_head, p_seq_len], p_farg => ARRAY[p_dropout], p_seed => p_seed"),
]


def _wrappers() -> str:
    out = []
    for name, args, kernel, rec in WRAPPERS:
        body = f"SELECT llm_tape_record(p_tape, '{name}', {kernel}, {rec})"
        out.append(function(f"llm_t_{name}", f"p_tape BIGINT, {args}", "BIGINT", body, language="sql",
                            note=f"Recording wrapper: {name} forward, appended to the tape when p_tape is set."))
    body = plpgsql("", """
        IF p_rate = 0 THEN
          RETURN p_x;  -- identity: nothing to record
        END IF;
        RETURN llm_tape_record(p_tape, 'dropout', llm_dropout(p_x, p_rate, p_seed), p_x, p_farg => ARRAY[p_rate],
                               p_seed => p_seed);
    """)
    out.append(function("llm_t_dropout", "p_tape BIGINT, p_x BIGINT, p_rate FLOAT8, p_seed BIGINT", "BIGINT", body,
                        note="Recording wrapper: inverted dropout (rate 0 is the identity and records nothing)."))
    out.append(_linear())
    out.append(function("llm_site_seed", "p_seed BIGINT, p_site TEXT", "BIGINT", """
        SELECT ('x' || substr(md5(p_seed::TEXT || ':' || p_site), 1, 15))::BIT(60)::BIGINT""",
                        language="sql", volatility="IMMUTABLE", strict=True,
                        note="A non-negative 60-bit seed for one dropout site (e.g. 'h.3.attn') of a step's seed."))
    return "\n".join(out)


LINEAR = """
    v_w := llm_param(p_model, p_prefix || '.weight');
    v_b := llm_param(p_model, p_prefix || '.bias');
    IF p_residual IS NOT NULL AND p_dropout = 0 AND NOT (p_gelu AND p_tape IS NOT NULL) THEN
      -- r + act(x @ W + b) in one kernel, recorded as linear + add
      v_lin := (
        @like
      );
      v_out := llm_linear(p_x, v_w, v_b, p_gelu, p_residual => p_residual);
      PERFORM llm_tape_record(p_tape, 'linear', v_lin, p_x, v_w, v_b);
      RETURN llm_tape_record(p_tape, 'add', v_out, p_residual, v_lin);
    END IF;
    IF p_gelu AND p_tape IS NOT NULL THEN  -- the GELU backward needs x @ W + b: written to v_pre as well
      v_pre := (
        @like
      );
      v_out := llm_linear(p_x, v_w, v_b, TRUE, p_pre => v_pre);
      PERFORM llm_tape_record(p_tape, 'linear', v_pre, p_x, v_w, v_b);
      v_out := llm_tape_record(p_tape, 'gelu', v_out, v_pre);
    ELSE
      v_out := llm_tape_record(p_tape, 'linear', llm_linear(p_x, v_w, v_b, p_gelu), p_x, v_w, v_b);
    END IF;
    v_out := llm_t_dropout(p_tape, v_out, p_dropout, p_seed);
    IF p_residual IS NOT NULL THEN
      v_out := llm_t_add(p_tape, p_residual, v_out);
    END IF;
    RETURN v_out;
"""
LIKE = """
    SELECT llm_tensor_create('linear_out', ARRAY[llm_rows(x.shape), llm_cols(w.shape)],
                             ARRAY[least(x.tile[1], llm_rows(x.shape)), least(w.tile[2], llm_cols(w.shape))])
    FROM llm_tensor AS x, llm_tensor AS w WHERE x.id = p_x AND w.id = v_w"""


def _linear() -> str:
    body = plpgsql("v_w BIGINT; v_b BIGINT; v_pre BIGINT; v_lin BIGINT; v_out BIGINT;", LINEAR, like=LIKE)
    return function("llm_t_linear", "p_tape BIGINT, p_x BIGINT, p_model TEXT, p_prefix TEXT, "
                    "p_gelu BOOLEAN DEFAULT FALSE, p_residual BIGINT DEFAULT NULL, p_dropout FLOAT8 DEFAULT 0, "
                    "p_seed BIGINT DEFAULT 0", "BIGINT", body, settings=KERNEL_SETTINGS,
                    note="""Recording wrapper: GPT-2 Conv1D [r +] dropout(act(x @ weight [in, out] + bias)) with
                    fused llm_linear calls. Recorded as 'linear' [+ 'gelu' from a saved pre-activation] [+ 'dropout']
                    [+ 'add']; with a residual and no dropout the add is fused too and 'linear' records an empty
                    stand-in for its output (backward only needs its gradient).""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), _record(), _wrappers()])


__all__ = ["emit", "KERNEL_SETTINGS"]
