"""Checkpoints inside the database, and the parameters as rows (llm_param).

llm_checkpoint_save(model) snapshots a model's durable state: its parameters (role param), its AdamW moments
(roles adam_m, adam_v, when present) and llm_model.step, which is the whole optimizer/RNG position (all
randomness of step s derives from (seed, s)). The snapshot tensors are ordinary durable llm_tensor rows with
the same names and roles, owned by the reserved model name '@ckpt/<id>' (llm_checkpoint.store; model names
cannot start with '@'); their tiles are copied server-side with INSERT ... SELECT, bytea for bytea, so a load
is bit-identical. They live in the logged partition and survive a crash like the model itself.

llm_checkpoint_load(model, id) puts the snapshot back into the same tensor ids where it can (tensors the
snapshot lacks, e.g. moments created after the save, are dropped; missing ones are created), resets
llm_model.step and deletes the llm_train_log rows of later steps (an abandoned future: training from the
restored step replays them, since step s's randomness derives from (seed, s)). Scratch tensors (grads,
activations) are not part of a checkpoint. Save and load lock the llm_model row, so they wait for (and hold
off) a concurrent llm_train_step of that model.

Checkpoints do not depend on the model row: they survive llm_model_drop (llm_checkpoints.model_exists says
so) until llm_checkpoint_drop(id); a load then needs the model re-created with the same config. A
checkpoint loads only into the model it was saved from; to start another model from it, go through a file
(pg-llm checkpoint export / import).

llm_param (model, name, shape, tr, tc, vals float4[]) and llm_param_rows (model, name, shape, row_index,
vals) show every model's parameters decoded from the tiles; filter by model and name.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import OWNER

SQL_FILE = "api/checkpoint.sql"
ORDER = 78

STATE = "('param', 'adam_m', 'adam_v')"
CONFLICT = "#variable_conflict use_column\n"  # parameters are named model/id/note like the columns
KNOWN = """
    SELECT coalesce(string_agg(k.id::TEXT || ' (step ' || k.step || ')', ', ' ORDER BY k.id), '(none)')
    FROM llm_checkpoint AS k WHERE k.model = v_model"""


def _table() -> str:
    return stmt("""
        CREATE TABLE llm_checkpoint (
          id BIGSERIAL PRIMARY KEY,
          model TEXT NOT NULL,
          config TEXT NOT NULL REFERENCES llm_model_config (name),
          step BIGINT NOT NULL CHECK (step >= 0),
          note TEXT,
          n_params BIGINT NOT NULL,
          n_tensors INT NOT NULL,
          moments TEXT[] NOT NULL DEFAULT '{}',
          store TEXT NOT NULL UNIQUE,
          created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          model_created_at TIMESTAMPTZ NOT NULL,
          """ + OWNER + """,
          CHECK (store = '@ckpt/' || id)
        )""", "A saved model state: parameters, AdamW moments (the roles in `moments`) and the optimizer step. "
              "Its tensors are llm_tensor rows owned by the reserved model name `store` ('@ckpt/<id>').")


def _get() -> str:
    body = plpgsql("r llm_checkpoint; v_model TEXT; v_known TEXT;", """
        SELECT * INTO r FROM llm_checkpoint AS k WHERE k.id = p_id;
        v_model := coalesce(p_model, r.model);
        IF r.id IS NULL THEN
          v_known := (
            @known
          );
          RAISE EXCEPTION 'pg_llm: unknown checkpoint %', p_id
            USING HINT = CASE WHEN v_model IS NULL THEN 'List checkpoints with SELECT * FROM llm_checkpoints;'
                         ELSE format('Checkpoints of model "%s": %s. Save one with SELECT llm_checkpoint_save(''%s'').',
                                     v_model, v_known, v_model) END;
        END IF;
        IF p_model IS NOT NULL AND r.model <> p_model THEN
          RAISE EXCEPTION 'pg_llm: checkpoint % belongs to model "%", not "%"', p_id, r.model, p_model
            USING HINT = format('A checkpoint loads only into its own model. To start "%s" from it, go through a '
                                'file: pg-llm checkpoint export --model %s --id %s F.npz, then pg-llm checkpoint '
                                'import --model %s F.npz.', p_model, r.model, p_id, p_model);
        END IF;
        RETURN r;
    """, known=KNOWN)
    return function("llm_checkpoint_get", "p_id BIGINT, p_model TEXT DEFAULT NULL", "llm_checkpoint", body,
                    volatility="STABLE", note="A checkpoint row by id, or a clear error (unknown id; with p_model, "
                    "a checkpoint of another model).")


def _save() -> str:
    n_params = """
        SELECT sum(llm_rows(v.shape)::BIGINT * llm_cols(v.shape))::BIGINT FROM llm_tensor AS v
        WHERE v.model = v_model AND v.role = 'param' AND v.id > 0"""
    moments = """
        SELECT coalesce(array_agg(DISTINCT v.role ORDER BY v.role), '{}') FROM llm_tensor AS v
        WHERE v.model = v_model AND v.role IN ('adam_m', 'adam_v') AND v.id > 0"""
    tensors = f"""
        INSERT INTO llm_tensor (id, model, name, role, shape, tile)
        SELECT nextval('llm_tensor_durable_id'), v_store, v.name, v.role, v.shape, v.tile FROM llm_tensor AS v
        WHERE v.model = v_model AND v.role IN {STATE} AND v.id > 0"""
    tiles = f"""
        INSERT INTO llm_tile (tensor_id, tr, tc, data)
        SELECT d.id, t.tr, t.tc, t.data
        FROM llm_tensor AS s
        JOIN llm_tensor AS d ON d.model = v_store AND d.name = s.name AND d.role = s.role AND d.id > 0
        JOIN llm_tile AS t ON t.tensor_id = s.id
        WHERE s.model = v_model AND s.role IN {STATE} AND s.id > 0"""
    ins = """
        INSERT INTO llm_checkpoint (id, model, config, step, note, n_params, n_tensors, moments, store,
                                    model_created_at)
        VALUES (v_id, v_model, c.name, v_step, llm_checkpoint_save.note, v_params, v_n, v_moments, v_store,
                (SELECT m.created_at FROM llm_model AS m WHERE m.name = v_model))"""
    n_tensors = f"""
        SELECT count(*) FROM llm_tensor AS v WHERE v.model = v_model AND v.role IN {STATE} AND v.id > 0"""
    body = CONFLICT + plpgsql("""
        c llm_model_config; v_model TEXT; v_id BIGINT; v_store TEXT; v_step BIGINT; v_n INT; v_params BIGINT;
        v_moments TEXT[];
    """, """
        v_model := llm_checkpoint_save.model;
        c := llm_model_check(v_model);
        PERFORM llm_model_writable(v_model, 'llm_checkpoint_save');
        -- a concurrent training step cannot commit a new step until this transaction ends
        SELECT m.step INTO v_step FROM llm_model AS m WHERE m.name = v_model FOR SHARE;
        v_id := nextval(pg_get_serial_sequence('llm_checkpoint', 'id'));
        v_store := '@ckpt/' || v_id;
        v_params := (
          @n_params
        );
        v_moments := (
          @moments
        );
        v_n := (
          @n_tensors
        );
        @ins;  -- first: the store is the checkpoint's, so row-level security lets its saver write its tensors
        @tensors;
        @tiles;
        RETURN v_id;
    """, n_params=n_params, moments=moments, n_tensors=n_tensors, tensors=tensors, tiles=tiles, ins=ins)
    return function("llm_checkpoint_save", "model TEXT, note TEXT DEFAULT NULL", "BIGINT", body,
                    settings=("jit = off",), note="Snapshot a model inside the database: parameters, AdamW "
                    "moments (adam_m, adam_v if present) and llm_model.step, tiles copied server-side. Returns "
                    "the checkpoint id (see llm_checkpoints; restore with llm_checkpoint_load(model, id)).")


def _load() -> str:
    # the first few differences and how many more: a whole different config used to list every tensor (~12 KB)
    misfit = """
        SELECT string_agg(x.msg, '; ' ORDER BY x.k) FILTER (WHERE x.k <= 4)
               || CASE WHEN count(*) > 4 THEN '; and ' || (count(*) - 4) || ' more' ELSE '' END
        FROM (
          SELECT coalesce(p.name, s.name) || ': ' || coalesce(llm_shape_text(s.shape), 'missing')
                 || ' in the checkpoint, ' || coalesce(llm_shape_text(p.shape), 'not a parameter')
                 || ' in the model' AS msg, row_number() OVER (ORDER BY coalesce(p.name, s.name)) AS k
          FROM llm_param_names(c.name) AS p
          FULL JOIN (
            SELECT v.name, v.shape FROM llm_tensor AS v WHERE v.model = r.store AND v.role = 'param' AND v.id > 0
          ) AS s ON s.name = p.name
          WHERE s.shape IS DISTINCT FROM p.shape
        ) AS x"""
    drop_extra = f"""
        DELETE FROM llm_tensor AS d
        WHERE d.model = v_model AND d.role IN {STATE} AND d.id > 0
          AND NOT EXISTS (SELECT 1 FROM llm_tensor AS s WHERE s.model = r.store AND s.name = d.name
                          AND s.role = d.role AND s.id > 0)"""
    geometry = """
        UPDATE llm_tensor AS d SET shape = s.shape, tile = s.tile
        FROM llm_tensor AS s
        WHERE s.model = r.store AND s.id > 0 AND d.model = v_model AND d.name = s.name AND d.role = s.role
          AND d.id > 0 AND (d.shape <> s.shape OR d.tile <> s.tile)"""
    add_missing = """
        INSERT INTO llm_tensor (id, model, name, role, shape, tile)
        SELECT nextval('llm_tensor_durable_id'), v_model, s.name, s.role, s.shape, s.tile FROM llm_tensor AS s
        WHERE s.model = r.store AND s.id > 0
          AND NOT EXISTS (SELECT 1 FROM llm_tensor AS d WHERE d.model = v_model AND d.name = s.name
                          AND d.role = s.role AND d.id > 0)"""
    clear = f"""
        DELETE FROM llm_tile AS t USING llm_tensor AS d
        WHERE t.tensor_id = d.id AND d.model = v_model AND d.role IN {STATE} AND d.id > 0"""
    copy = """
        INSERT INTO llm_tile (tensor_id, tr, tc, data)
        SELECT d.id, t.tr, t.tc, t.data
        FROM llm_tensor AS s
        JOIN llm_tensor AS d ON d.model = v_model AND d.name = s.name AND d.role = s.role AND d.id > 0
        JOIN llm_tile AS t ON t.tensor_id = s.id
        WHERE s.model = r.store AND s.id > 0"""
    body = CONFLICT + plpgsql("r llm_checkpoint; c llm_model_config; v_model TEXT; v_problem TEXT;", """
        v_model := llm_checkpoint_load.model;
        r := llm_checkpoint_get(llm_checkpoint_load.id, v_model);
        PERFORM llm_model_writable(v_model, 'llm_checkpoint_load');  -- before FOR UPDATE, which would hide it
        PERFORM 1 FROM llm_model AS m WHERE m.name = v_model FOR UPDATE;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'pg_llm: model "%" does not exist (checkpoint % was saved from it at step %)',
            v_model, r.id, r.step
            USING HINT = format('Re-create it with SELECT llm_model_create(''%s'', ''%s'') and load again.',
                                v_model, r.config);
        END IF;
        c := llm_model_get(v_model);
        v_problem := (
          @misfit
        );
        IF v_problem IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: checkpoint % (config %) does not fit model "%" (config %): %', r.id, r.config,
            v_model, c.name, v_problem
            USING HINT = format('Load it into a model of config %s: SELECT llm_model_create(''new_name'', %L), '
                                'then llm_checkpoint_load(''new_name'', %s).', r.config, r.config, r.id);
        END IF;
        PERFORM llm_model_write_lock(v_model);
        -- ---- nothing was written above this line ----
        @drop_extra;
        @geometry;
        @add_missing;
        @clear;
        @copy;
        @set_step;
        IF to_regclass('llm_train_log') IS NOT NULL THEN
          @forget;
        END IF;
        RETURN r;
    """, misfit=misfit, drop_extra=drop_extra, geometry=geometry, add_missing=add_missing, clear=clear, copy=copy,
        set_step="UPDATE llm_model SET step = r.step WHERE name = v_model",
        forget="DELETE FROM llm_train_log WHERE model = v_model AND step > r.step")
    return function("llm_checkpoint_load", "model TEXT, id BIGINT", "llm_checkpoint", body, settings=("jit = off",),
                    note="Restore a model from one of its checkpoints: parameters and AdamW moments bit-identical "
                    "(tensors the checkpoint lacks are dropped), llm_model.step reset, llm_train_log rows after "
                    "that step deleted (training replays them). Errors (unknown id, a "
                    "checkpoint of another model, model missing, config mismatch) change nothing.")


def _drop() -> str:
    body = CONFLICT + plpgsql("r llm_checkpoint; v_n BIGINT;", """
        SELECT * INTO r FROM llm_checkpoint AS k WHERE k.id = llm_checkpoint_drop.id;
        IF r.id IS NULL THEN
          IF if_exists THEN
            RETURN 0;
          END IF;
          r := llm_checkpoint_get(llm_checkpoint_drop.id);
        END IF;
        IF NOT r.store IN (SELECT w.name FROM llm_writable_models() AS w) THEN
          RAISE EXCEPTION 'pg_llm: llm_checkpoint_drop: checkpoint % belongs to role %', r.id, r.owner
            USING HINT = 'Its owner, the owner of its model, or a member of llm_admin may drop it.';
        END IF;
        DELETE FROM llm_tensor WHERE model = r.store;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        DELETE FROM llm_checkpoint WHERE id = r.id;
        RETURN v_n;
    """)
    return function("llm_checkpoint_drop", "id BIGINT, if_exists BOOLEAN DEFAULT FALSE", "BIGINT", body,
                    note="Drop a checkpoint and its snapshot tensors; returns how many tensors were dropped.")


def _views() -> str:
    out = [stmt("""
        CREATE VIEW llm_checkpoints AS
        SELECT k.id, k.model, k.config, k.step, k.note, k.n_params, k.n_tensors, k.moments,
               coalesce(s.bytes, 0) AS bytes, EXISTS (SELECT 1 FROM llm_model AS m WHERE m.name = k.model
                                                      AND m.created_at = k.model_created_at) AS model_exists,
               k.created_at, k.owner
        FROM llm_checkpoint AS k
        LEFT JOIN LATERAL (
          SELECT sum(4 * llm_rows(v.shape)::BIGINT * llm_cols(v.shape))::BIGINT AS bytes
          FROM llm_tensor AS v
          WHERE v.model = k.store AND v.id > 0
        ) AS s ON TRUE""", "Every checkpoint with its model, step, sizes, the moments it holds and whether the "
                           "model it was saved from still exists (not a model re-created under its name).")]
    out.append(stmt("""
        CREATE VIEW llm_param AS
        SELECT v.model, v.name, v.shape, t.tr, t.tc, llm_tile_to_float4(t.data) AS vals
        FROM llm_tensor AS v
        JOIN llm_model AS m ON m.name = v.model
        JOIN llm_tile AS t ON t.tensor_id = v.id
        WHERE v.role = 'param' AND v.id > 0""",
        "The parameters of every model, one row per tile: (model, name, shape, tile row tr, tile column tc, "
        "vals float4[] of the tile, row-major). Filter by model and name: values are decoded on demand."))
    out.append(stmt("""
        CREATE VIEW llm_param_rows AS
        SELECT v.model, v.name, v.shape, r.row_index, r.vals
        FROM llm_tensor AS v
        JOIN llm_model AS m ON m.name = v.model
        CROSS JOIN LATERAL llm_tensor_rows(v.id) AS r
        WHERE v.role = 'param' AND v.id > 0""",
        "The parameters row-wise: (model, name, shape, row_index, vals float4[] of the whole row); a 1-D "
        "parameter is one row. Filter by model and name."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _table(), _get(), _save(), _load(), _drop(), _views()])
