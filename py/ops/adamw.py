"""adamw: one AdamW step on one parameter tensor, in place, exactly as torch.optim.AdamW (single-tensor form).

    g <- grad_scale * grad                       (grad_scale: clip coefficient and/or 1 / accumulation steps)
    p <- p * (1 - lr * weight_decay)             (decoupled weight decay)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

`t` is the optimizer step, starting at 1. llm_adamw_step(param, grad, m, v, t, lr, ...): param, grad, m and v must
be four different tensors of one shape, cut in the same tiles. One llm_mk_adamw_rows call per chunk of whole
tile rows holding at most 64M parameter floats (setting pg_llm.adamw_chunk_floats) reads the four tiles of each
(tr, tc) through a cursor, 16 at a time, steps them (llm_mk_adamw's function) and writes the three new tiles with
a prepared UPDATE each, so memory stays bounded and no new payload is materialized twice. A call over the whole
param reads it from the weight cache and leaves the new value there for the next step's forward; with the
gradient held in memory (ops/held.py) it also takes m and v from the cache, steps the whole arrays, writes each new
tile and leaves the new m and v in the cache. Arithmetic is in
float32 like torch's, in place (float64 was 2.7x slower per tile and no closer to torch's float32 results). The
numpy side: py/kernels/adamw.py.

Optimizer state: llm_adamw_state(param) returns (m_id, v_id), the durable tensors of roles adam_m / adam_v with
the parameter's model and name, creating them zero-filled when missing (the first step's state).
Utilities: llm_tensor_zero(id) fills every tile of a tensor with zeros (creating missing tiles: zero_grad);
llm_tensor_zeros_like(id, role, name, model) creates a zero tensor with the same shape and tiling.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, kernel_body, microkernel, plpgsql
from pg_llm.kernels.adamw import adamw_rows, adamw_tile
from pg_llm.ops.common import KERNEL_SETTINGS
from pg_llm.ops.elementwise import eff_tile, lines, n_tiles, same_layout

SQL_FILE = "kernels/adamw.sql"
ORDER = 40
CHUNK_FLOATS = 64 * 1024 * 1024  # parameter floats per call (256 MiB: any GPT-2 small tensor in one call, whose
# param then stays in the weight cache; pg_llm.adamw_chunk_floats overrides)


# ---- SQL ----------------------------------------------------------------------------------------------------

def _require(cond: str, msg: str, *args: str) -> str:
    """PL/pgSQL: raise 'pg_llm: adamw: <msg>' unless cond is TRUE (NULL fails too)."""
    fmt = ", ".join(("'pg_llm: adamw: " + msg + "'", *args))
    return f"""
        IF ({cond}) IS NOT TRUE THEN
          RAISE EXCEPTION {fmt};
        END IF;"""


def _step() -> str:
    inf = "'Infinity'::FLOAT8"
    body = plpgsql("""
        rp llm_tensor; rg llm_tensor; rm llm_tensor; rv llm_tensor;
        v_tile INT[]; v_h FLOAT8[]; v_want BIGINT; v_written BIGINT := 0; v_chunk INT;
    """, lines(
        _require("p_step >= 1", "step must be >= 1 (the first optimizer step is 1), got %", "p_step"),
        _require(f"p_lr >= 0 AND p_lr < {inf}", "lr must be finite and >= 0, got %", "p_lr"),
        _require("p_beta1 >= 0 AND p_beta1 < 1", "beta1 must be in [0, 1), got %", "p_beta1"),
        _require("p_beta2 >= 0 AND p_beta2 < 1", "beta2 must be in [0, 1), got %", "p_beta2"),
        _require(f"p_eps >= 0 AND p_eps < {inf}", "eps must be finite and >= 0, got %", "p_eps"),
        _require(f"p_weight_decay >= 0 AND p_weight_decay < {inf}", "weight_decay must be finite and >= 0, got %",
                 "p_weight_decay"),
        _require(f"p_grad_scale >= 0 AND p_grad_scale < {inf}",
                 "grad_scale must be finite and >= 0, got % (a NaN clip coefficient means a non-finite gradient "
                 "norm: skip the step)", "p_grad_scale"),
        """
        rp := llm_input(p_param, 'adamw', 'param');
        rg := llm_input(p_grad, 'adamw', 'grad');
        rm := llm_input(p_m, 'adamw', 'm');
        rv := llm_input(p_v, 'adamw', 'v');""",
        _require("cardinality(ARRAY(SELECT DISTINCT u FROM unnest(ARRAY[p_param, p_grad, p_m, p_v]) AS u)) = 4",
                 "param, grad, m and v must be four different tensors, got ids %, %, %, %",
                 "p_param", "p_grad", "p_m", "p_v"),
        same_layout("adamw", "rp", "param", "rg", "grad"),
        same_layout("adamw", "rp", "param", "rm", "m"),
        same_layout("adamw", "rp", "param", "rv", "v"),
        f"""
        v_h := ARRAY[p_lr, p_beta1, p_beta2, p_eps, p_weight_decay, p_grad_scale, p_step];
        v_want := 3 * {n_tiles("llm_rows(rp.shape)", "llm_cols(rp.shape)", "v_tile")};
        -- chunks of v_chunk whole tile rows of at most pg_llm.adamw_chunk_floats parameter floats
        v_chunk := greatest(1, coalesce(nullif(current_setting('pg_llm.adamw_chunk_floats', TRUE), '')::BIGINT,
                                        {CHUNK_FLOATS}) / (v_tile[1]::BIGINT * llm_cols(rp.shape)));
        FOR v_r0 IN 0..(llm_rows(rp.shape) - 1) / v_tile[1] BY v_chunk LOOP
          v_written := v_written + llm_mk_adamw_rows(ARRAY[p_param, p_grad, p_m, p_v], v_h, v_r0, v_r0 + v_chunk,
                                                     ARRAY[llm_rows(rp.shape), llm_cols(rp.shape)] || v_tile);
        END LOOP;
        IF v_written <> v_want THEN
          RAISE EXCEPTION 'pg_llm: adamw: updated % of the % tiles of param "%", m and v: a tensor is missing tiles',
            v_written, v_want, rp.name USING HINT = 'Check the tensors with llm_tensor_validate(id).';
        END IF;
        RETURN p_param;"""))
    return function(
        "llm_adamw_step",
        "p_param BIGINT, p_grad BIGINT, p_m BIGINT, p_v BIGINT, p_step INT, p_lr FLOAT8, "
        "p_beta1 FLOAT8 DEFAULT 0.9, p_beta2 FLOAT8 DEFAULT 0.999, p_eps FLOAT8 DEFAULT 1e-8, "
        "p_weight_decay FLOAT8 DEFAULT 0.01, p_grad_scale FLOAT8 DEFAULT 1.0",
        "BIGINT", body, settings=KERNEL_SETTINGS, note="""
        op: AdamW step (torch.optim.AdamW) on one parameter, in place: param, m and v are updated from
        grad_scale * grad at optimizer step p_step (1 for the first step; bias corrections 1 - beta^step).
        tiling: param, grad, m, v of one shape and tiling; one llm_mk_adamw_rows call per chunk of tile rows steps
        each tile and writes the three new payloads. Errors (bad hyperparameters, shapes, missing tiles) write
        nothing (a missing tile is found after the writes and the error rolls them back).
        Returns p_param.""")


def _state() -> str:
    find = ("SELECT t.id FROM llm_tensor AS t "
            "WHERE t.model = rp.model AND t.name = rp.name AND t.role = v_role AND t.id > 0")
    body = plpgsql("rp llm_tensor; rs llm_tensor; v_role TEXT; v_found BIGINT;", f"""
        rp := llm_input(p_param, 'adamw_state', 'param');
        IF rp.role <> 'param' THEN
          RAISE EXCEPTION 'pg_llm: adamw_state: tensor "%" (id %) has role %, expected a durable param tensor',
            rp.name, p_param, rp.role USING HINT = 'Optimizer state is kept for tensors of role param.';
        END IF;
        FOREACH v_role IN ARRAY ARRAY['adam_m', 'adam_v'] LOOP
          v_found := (
            @find
          );
          IF v_found IS NULL THEN
            v_found := llm_tensor_zeros_like(p_param, v_role);
          ELSE
            rs := llm_tensor_get(v_found);
            IF llm_rows(rs.shape) <> llm_rows(rp.shape) OR llm_cols(rs.shape) <> llm_cols(rp.shape)
               OR {eff_tile("rs")} <> {eff_tile("rp")} THEN
              RAISE EXCEPTION 'pg_llm: adamw_state: % tensor "%" (id %) has shape % tile %, expected shape % tile % '
                '(those of param "%")', v_role, rs.name, v_found, llm_shape_text(rs.shape), {eff_tile("rs")},
                llm_shape_text(rp.shape), {eff_tile("rp")}, rp.name
                USING HINT = 'Drop the stale state (llm_tensor_drop(id)) to restart it from zeros.';
            END IF;
          END IF;
          IF v_role = 'adam_m' THEN m_id := v_found; ELSE v_id := v_found; END IF;
        END LOOP;""", find=find)
    return function("llm_adamw_state", "p_param BIGINT, OUT m_id BIGINT, OUT v_id BIGINT", "RECORD", body,
                    settings=KERNEL_SETTINGS, note="""
        AdamW state of a durable parameter: (m_id, v_id), the tensors of roles adam_m and adam_v with the
        parameter's model and name, created zero-filled with its shape and tiling when missing.""")


ZERO = """
    INSERT INTO llm_tile (tensor_id, tr, tc, data)
    SELECT p_id, i.tr, j.tc,
           decode(repeat('00', 4 * llm_tile_dim(v_rows, r.tile[1], i.tr) * llm_tile_dim(v_cols, r.tile[2], j.tc)),
                  'hex')
    FROM generate_series(0, (v_rows + r.tile[1] - 1) / r.tile[1] - 1) AS i(tr)
    CROSS JOIN generate_series(0, (v_cols + r.tile[2] - 1) / r.tile[2] - 1) AS j(tc)
    WHERE TRUE
    ON CONFLICT (tensor_id, tr, tc) DO UPDATE SET data = excluded.data"""


def _zero() -> str:
    body = plpgsql("r llm_tensor; v_rows INT; v_cols INT;", """
        r := llm_input(p_id, 'tensor_zero', 'tensor');
        v_rows := llm_rows(r.shape);
        v_cols := llm_cols(r.shape);
        @zero;
        RETURN p_id;
    """, zero=ZERO)
    out = [function("llm_tensor_zero", "p_id BIGINT", "BIGINT", body, settings=KERNEL_SETTINGS, note="""
        Fill every tile of a tensor with zeros in place, creating missing tiles (e.g. zero_grad). Returns p_id.""")]
    find = ("SELECT t.id FROM llm_tensor AS t "
            "WHERE t.model = v_model AND t.name = v_name AND t.role = p_role AND t.id > 0")
    body = plpgsql("r llm_tensor; v_name TEXT; v_model TEXT; v_found BIGINT; v_new BIGINT;", """
        r := llm_input(p_id, 'zeros_like', 'tensor');
        v_name := coalesce(p_name, r.name);
        v_model := coalesce(p_model, r.model);
        v_found := (
          @find
        );
        IF v_found IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: zeros_like: tensor "%" (role %) of model "%" already exists (id %)',
            v_name, p_role, v_model, v_found USING HINT = 'Use llm_tensor_zero(id) to clear it.';
        END IF;
        v_new := llm_tensor_create(v_name, r.shape, r.tile, p_role, v_model);
        RETURN llm_tensor_zero(v_new);
    """, find=find)
    out.append(function("llm_tensor_zeros_like",
                        "p_id BIGINT, p_role TEXT DEFAULT 'activation', p_name TEXT DEFAULT NULL, "
                        "p_model TEXT DEFAULT NULL", "BIGINT", body, settings=KERNEL_SETTINGS, note="""
        A new zero-filled tensor with the shape and tiling of p_id, of role p_role (a scratch role gives a scratch
        tensor), named p_name in model p_model (default: p_id's). Returns its id."""))
    return "\n".join(out)


def emit() -> str:
    mk = microkernel("llm_mk_adamw", "p BYTEA, g BYTEA, m BYTEA, v BYTEA, h FLOAT8[]", "BYTEA[]", adamw_tile,
                     note="""
        adamw microkernel: one tile's new ARRAY[param, m, v] payloads (h, w) from param, grad, m, v tiles (h, w);
        h = [lr, beta1, beta2, eps, weight_decay, grad_scale, step t], bias corrections 1 - beta^t.""")
    rows = function("llm_mk_adamw_rows", "ids BIGINT[], h FLOAT8[], r0 INT, r1 INT, geom INT[]", "BIGINT",
                    kernel_body(adamw_rows, "adamw_rows(plpy, GD, ids, h, r0, r1, geom)"), language="plpython3u",
                    strict=True, settings=("jit = off",), note="""
        adamw kernel: llm_mk_adamw's step on every tile of tile rows [r0, r1) of param ids[1] (grad, m, v:
        ids[2:4]; geom = [rows, cols, tile rows, tile cols]), writing the new param, m and v tiles itself; returns
        the number of tiles written. A call over the whole param takes it from, and leaves its new value in, the
        weight cache.""")
    return "\n".join([comment(__doc__ or "") + "\n", _zero(), mk, rows, _step(), _state()])
