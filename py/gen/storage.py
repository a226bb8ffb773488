"""Tiled tensor storage: the catalog `llm_tensor` and the tile table `llm_tile`.

A tensor is 1-D (n) or 2-D (rows, cols); a 1-D tensor is stored as one row (1, n). It is cut into tiles of
`tile` = (tile_rows, tile_cols); edge tiles are ragged (never padded). Tile (tr, tc) holds rows
[tr*tile_rows, min((tr+1)*tile_rows, rows)) and the matching columns, as raw little-endian float32 in
row-major order: a bytea, because float4[] costs 0.5-0.8 us per element leaving PL/Python and bytea ~0.5 ns.

Durable tensors (param, adam_m, adam_v) have positive ids and live in the logged partition llm_tile_durable.
Scratch tensors (activation, cache, grad) have negative ids and live in the UNLOGGED partition
llm_tile_scratch: no WAL for what a training step or a forward pass throws away, and a crash empties them.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.sqlfmt import raw_ddl
from pg_llm.gen.surface import INTERNAL, OWNER

SQL_FILE = "kernels/00_storage.sql"
ORDER = 0

DEFAULT_TILE = (256, 256)
SCRATCH_ROLES = ("activation", "cache", "grad")
ROLES = ("param", "grad", "adam_m", "adam_v", "activation", "cache")


def _tables() -> str:
    roles = ", ".join(f"'{r}'" for r in ROLES)
    out = [stmt(f"CREATE SCHEMA {INTERNAL}", "pg_llm's internals (py/gen/surface.py): not in the user's namespace."),
           stmt(f"""
        CREATE TABLE llm_tensor (
          id BIGINT PRIMARY KEY,
          model TEXT NOT NULL DEFAULT '',
          name TEXT NOT NULL,
          role TEXT NOT NULL DEFAULT 'activation' CHECK (role IN ({roles})),
          shape INT[] NOT NULL CHECK (cardinality(shape) BETWEEN 1 AND 2 AND 0 < ALL(shape)),
          tile INT[] NOT NULL CHECK (cardinality(tile) = 2 AND 0 < ALL(tile)),
          dtype TEXT NOT NULL DEFAULT 'float32' CHECK (dtype = 'float32'),
          created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          backend_pid INT NOT NULL DEFAULT pg_backend_pid(),
          {OWNER},
          CHECK ((id > 0) = (role NOT IN ('activation', 'cache', 'grad')))
        )""", "Tensor catalog: one row per tensor. Scratch tensors (activation, cache) have negative ids.")]
    out.append(stmt("CREATE UNIQUE INDEX llm_tensor_name ON llm_tensor (model, name, role) WHERE id > 0",
                    "Durable tensors are found by (model, name, role): GPT-2 names such as h.0.attn.c_attn.weight."))
    out.append(stmt("CREATE SEQUENCE llm_tensor_durable_id START WITH 1 INCREMENT BY 1"))
    out.append(stmt("CREATE SEQUENCE llm_tensor_scratch_id START WITH -1 INCREMENT BY -1 MAXVALUE -1 "
                    "MINVALUE -9223372036854775807"))
    out.append(stmt("""
        CREATE TABLE llm_tile (
          tensor_id BIGINT NOT NULL REFERENCES llm_tensor (id) ON DELETE CASCADE,
          tr INT NOT NULL,
          tc INT NOT NULL,
          data BYTEA NOT NULL,
          PRIMARY KEY (tensor_id, tr, tc)
        ) PARTITION BY RANGE (tensor_id)""",
        "One row per tile: raw little-endian float32, row-major. Partitioned by id sign: durable vs scratch."))
    out.append(stmt("CREATE TABLE llm_tile_durable PARTITION OF llm_tile FOR VALUES FROM (1) TO (MAXVALUE)"))
    out.append(stmt("CREATE UNLOGGED TABLE llm_tile_scratch PARTITION OF llm_tile "
                    "FOR VALUES FROM (MINVALUE) TO (0)"))
    out.append(comment("pglz costs 2.5-4x on float payloads and saves nothing: store them uncompressed.") + "\n")
    for part in ("llm_tile_durable", "llm_tile_scratch"):
        out.append(raw_ddl(f"ALTER TABLE {part} ALTER COLUMN data SET STORAGE EXTERNAL") + ";\n")
    out.append(comment("A training step rewrites every parameter and moment tile: autovacuum's default 2 ms "
                       "cost delay let 40 steps of a 27M-parameter model leave 43x the live size on disk.") + "\n")
    for part in ("llm_tile_durable", "llm_tile_scratch"):
        out.append(raw_ddl(f"ALTER TABLE {part} SET (autovacuum_vacuum_cost_delay = 0, "
                           "toast.autovacuum_vacuum_cost_delay = 0)") + ";\n")
    return "\n".join(out)


def _helpers() -> str:
    out = [function("llm_tile_dim", "n INT, t INT, i INT", "INT", """
        SELECT least(t, n - i * t)""", language="sql", volatility="IMMUTABLE", strict=True, parallel="SAFE",
        note="Extent of tile i along an axis of length n cut in tiles of t (edge tiles are ragged).")]
    out.append(function("llm_rows", "shape INT[]", "INT", """
        SELECT CASE WHEN cardinality(shape) = 1 THEN 1 ELSE shape[1] END""",
        language="sql", volatility="IMMUTABLE", strict=True, parallel="SAFE",
        note="Stored rows of a tensor: a 1-D tensor of n is one row of n."))
    out.append(function("llm_cols", "shape INT[]", "INT", """
        SELECT shape[cardinality(shape)]""",
        language="sql", volatility="IMMUTABLE", strict=True, parallel="SAFE", note="Stored columns of a tensor."))
    out.append(function("llm_shape_text", "shape INT[]", "TEXT", """
        SELECT '(' || array_to_string(shape, ', ') || CASE WHEN cardinality(shape) = 1 THEN ',)' ELSE ')' END""",
        language="sql", volatility="IMMUTABLE", strict=True, parallel="SAFE",
        note="A shape as text for error messages, Python style: (3, 4) or (5,)."))
    return "\n".join(out)


def _create() -> str:
    th, tw = DEFAULT_TILE
    body = plpgsql("""
        v_id BIGINT;
        v_tile INT[];
    """, f"""
        IF p_shape IS NULL OR cardinality(p_shape) NOT BETWEEN 1 AND 2 OR NOT (0 < ALL(p_shape)) THEN
          RAISE EXCEPTION 'pg_llm: tensor "%" needs a 1-D or 2-D shape of positive sizes, got %', p_name, p_shape
            USING HINT = 'Shapes look like ARRAY[rows, cols] or ARRAY[n].';
        END IF;
        v_tile := coalesce(p_tile, ARRAY[least({th}, llm_rows(p_shape)), least({tw}, llm_cols(p_shape))]);
        IF cardinality(v_tile) <> 2 OR NOT (0 < ALL(v_tile)) THEN
          RAISE EXCEPTION 'pg_llm: tensor "%" has invalid tile shape % (want ARRAY[tile_rows, tile_cols] > 0)',
            p_name, v_tile;
        END IF;
        IF p_role IN ('activation', 'cache', 'grad') THEN
          v_id := nextval('llm_tensor_scratch_id');
        ELSE
          IF coalesce(p_model, '') <> '' AND NOT EXISTS (SELECT 1 FROM llm_model AS m WHERE m.name = p_model) THEN
            RAISE EXCEPTION 'pg_llm: llm_tensor_create: no model "%" for % tensor "%"', p_model, p_role, p_name
              USING HINT = 'Create the model (llm_model_create), or leave p_model out for a free-standing tensor.';
          END IF;
          IF coalesce(p_model, '') <> '' THEN
            PERFORM llm_model_writable(p_model, 'llm_tensor_create');
          END IF;
          v_id := nextval('llm_tensor_durable_id');
        END IF;
        @ins;
        RETURN v_id;
    """, ins="INSERT INTO llm_tensor (id, model, name, role, shape, tile) "
             "VALUES (v_id, p_model, p_name, p_role, p_shape, v_tile)")
    out = [function("llm_tensor_create",
                    "p_name TEXT, p_shape INT[], p_tile INT[] DEFAULT NULL, p_role TEXT DEFAULT 'activation', "
                    "p_model TEXT DEFAULT ''", "BIGINT", body,
                    note=f"Register an empty tensor; tile defaults to {th}x{tw} capped by the shape. Returns its id.")]
    body = plpgsql("v_id BIGINT;", """
        v_id := (
          @q
        );
        IF v_id IS NULL THEN
          RAISE EXCEPTION 'pg_llm: tensor "%" (role %) of model "%" does not exist', p_name, p_role, p_model
            USING HINT = 'List tensors with: SELECT model, name, role, shape FROM llm_tensors;';
        END IF;
        RETURN v_id;
    """, q="SELECT id FROM llm_tensor WHERE model = p_model AND name = p_name AND role = p_role AND id > 0")
    out.append(function("llm_tensor", "p_model TEXT, p_name TEXT, p_role TEXT DEFAULT 'param'", "BIGINT", body,
                        volatility="STABLE", note="Id of a durable tensor by model, GPT-2 name and role."))
    out.append(function("llm_param", "p_model TEXT, p_name TEXT", "BIGINT", """
        SELECT llm_tensor(p_model, p_name, 'param')""", language="sql", volatility="STABLE",
                        note="Id of a model parameter by its GPT-2 name (h.0.attn.c_attn.weight ...)."))
    body = plpgsql("r llm_tensor;", """
        SELECT * INTO r FROM llm_tensor WHERE id = p_id;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'pg_llm: tensor id % does not exist', p_id;
        END IF;
        RETURN r;
    """)
    out.append(function("llm_tensor_get", "p_id BIGINT", "llm_tensor", body, volatility="STABLE",
                        note="Catalog row of a tensor, or a clear error when it does not exist."))
    out.append(function("llm_tensor_drop", "p_id BIGINT", "VOID", plpgsql("r llm_tensor;", """
        r := llm_tensor_get(p_id);  -- an unknown id is an error, not a silent no-op
        IF r.role = 'param' AND EXISTS (SELECT 1 FROM llm_model AS m WHERE m.name = r.model) THEN
          RAISE EXCEPTION 'pg_llm: tensor "%" (id %) is a parameter of model "%": dropping it would break the model',
            r.name, p_id, r.model USING HINT = format('Drop the whole model with SELECT llm_model_drop(%L).', r.model);
        END IF;
        DELETE FROM llm_tensor WHERE id = p_id;
    """), note="Drop a tensor and its tiles (ON DELETE CASCADE); not a parameter of an existing model."))
    out.append(function("llm_scratch_mark", "", "BIGINT", """
        SELECT nextval('llm_tensor_scratch_id')""", language="sql",
        note="A mark: every scratch tensor created after it has a smaller id (see llm_scratch_release)."))
    out.append(function("llm_scratch_release", "p_mark BIGINT", "BIGINT", plpgsql("n BIGINT;", """
        DELETE FROM llm_tensor WHERE id < p_mark AND id < 0 AND backend_pid = pg_backend_pid();
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN n;
    """), note="Drop this backend's scratch tensors created after p_mark (the activations of one call)."))
    out.append(function("llm_scratch_clear", "", "BIGINT", plpgsql("n BIGINT;", """
        DELETE FROM llm_tensor AS v
        WHERE v.id < 0 AND (v.backend_pid = pg_backend_pid()
          OR NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = v.backend_pid));
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN n;
    """), note="Drop this backend's scratch tensors and those of backends that no longer run."))
    return "\n".join(out)


def _validate() -> str:
    check = ("""
        SELECT count(*) AS n,
               count(*) FILTER (WHERE t.tr < 0 OR t.tc < 0 OR t.tr * v.tile[1] >= llm_rows(v.shape)
                                OR t.tc * v.tile[2] >= llm_cols(v.shape)) AS outside,
               min(format('(%s, %s)', t.tr, t.tc)) FILTER (WHERE length(t.data) <> 4
                   * llm_tile_dim(llm_rows(v.shape), v.tile[1], t.tr)
                   * llm_tile_dim(llm_cols(v.shape), v.tile[2], t.tc)) AS bad
        FROM llm_tile AS t, llm_tensor AS v
        WHERE t.tensor_id = p_id AND v.id = p_id""")
    body = plpgsql("""
        r llm_tensor;
        v_n BIGINT; v_outside BIGINT; v_bad TEXT; v_want BIGINT;
    """, """
        r := llm_tensor_get(p_id);
        v_want := ((llm_rows(r.shape) + r.tile[1] - 1) / r.tile[1])::BIGINT
                * ((llm_cols(r.shape) + r.tile[2] - 1) / r.tile[2]);
        SELECT q.n, q.outside, q.bad INTO v_n, v_outside, v_bad FROM (
          @check
        ) AS q;
        IF v_bad IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: tensor "%" (id %): tile % has a payload whose length does not match its tile shape',
            r.name, p_id, v_bad USING HINT = format('shape %s, tile %s: each tile is 4 * rows * cols bytes',
            llm_shape_text(r.shape), r.tile);
        END IF;
        IF v_outside > 0 OR v_n <> v_want THEN
          RAISE EXCEPTION 'pg_llm: tensor "%" (id %) of shape % has % tiles, expected % (tile %)',
            r.name, p_id, llm_shape_text(r.shape), v_n, v_want, r.tile;
        END IF;
        RETURN r;
    """, check=check)
    return function("llm_tensor_validate", "p_id BIGINT", "llm_tensor", body, volatility="STABLE",
                    note="Check that a tensor has every tile and each payload has 4*rows*cols bytes.")


def _analyze() -> str:
    body = plpgsql("r RECORD; n INT := 0;", """
        FOR r IN
          @cold
        LOOP
          EXECUTE format('ANALYZE %s', r.relid::REGCLASS);
          n := n + 1;
        END LOOP;
        RETURN n;
    """, cold="""
        SELECT s.relid FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
        WHERE s.relid IN (to_regclass('llm_tensor'), to_regclass('llm_tile_durable'), to_regclass('llm_tile_scratch'),
                          to_regclass('llm_dataset'))
          AND s.last_analyze IS NULL AND s.last_autoanalyze IS NULL AND pg_has_role(c.relowner, 'USAGE')""")
    return function("llm_tables_analyze", "", "INT", body, note="""ANALYZE the tensor, tile and dataset tables
        if they never were (a fresh database: autovacuum's first pass comes up to a minute later). Without
        statistics the planner picked plans that made the first training steps of a 27M-parameter model 8x
        slower (19 s instead of 2.4 s). Tables the caller does not own are left alone. Returns how many.""")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), _helpers(), _create(), _validate(), _analyze()])
