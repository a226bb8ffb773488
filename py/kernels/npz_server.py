"""The server side of pg_llm_import_npz / pg_llm_export_npz (the SQL: py/api/npz.py): numpy's .npz reader and
writer inside the backend, with the rules of pg_llm.kernels.npz (the client's). The file check runs first:
COPY's rule, llm_server_file_check."""
from __future__ import annotations

import getpass
import os
import zipfile

import numpy as np

from pg_llm.kernels.npz import (
    infer_standard,
    npz_array,
    npz_classify,
    npz_header,
    npz_meta,
    npz_open,
    npz_write,
    shape_problems,
)


def server_import(plpy, path, model, fields, standard):
    """pg_llm_import_npz: everything checked before anything is written (one transaction)."""
    def fail(msg, hint=None, state="22023"):
        plpy.error("pg_llm: pg_llm_import_npz: " + msg, hint=hint, sqlstate=state)

    def q(sql, types, args):
        return plpy.execute(plpy.prepare(sql, types), args)

    q("SELECT llm_server_file_check($1, FALSE, 'pg_llm_import_npz')", ["text"], [path])
    if not model:
        fail("a model needs a non-empty name")
    q("SELECT llm_model_writable($1, 'pg_llm_import_npz')", ["text"], [model])  # an existing model: ours to change?
    if not os.path.isfile(path):
        fail(f"{path}: no such file on the database server", state="58P01",
             hint="The path is opened by the server process (relative paths start in its data directory); for a "
                  "file on your machine use pg-llm model import.")
    if not os.access(path, os.R_OK):
        fail(f"{path}: the database server's OS user ({getpass.getuser()}) cannot read it",
             state="42501", hint="Make the file readable by the server's OS user, or import it client-side with "
                                 "pg-llm model import.")
    try:
        z = npz_open(path)
        params, _, meta_key = npz_classify(z.files)
        shapes = {n: npz_header(z, k)[0] for n, k in params.items()}
        meta = npz_meta(z, meta_key) if meta_key else {}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        fail(str(e) if str(e).startswith(str(path)) else f"{path}: {e}")
    rows = {r["name"]: r for r in plpy.execute("SELECT * FROM llm_model_config")}
    have = q("SELECT m.config FROM llm_model AS m WHERE m.name = $1", ["text"], [model])
    n = q("SELECT count(*) AS n FROM llm_tensor WHERE model = $1 AND id > 0", ["text"], [model])[0]["n"]
    if n:
        fail(f'model "{model}" already exists with {n} tensors' if have else
             f'model "{model}" has {n} tensors but no llm_model row', state="42710",
             hint=f"Drop it first with SELECT llm_model_drop('{model}', TRUE), or import client-side with "
                  f"pg-llm model import --name {model} --replace PATH.")
    mcfg = meta.get("config") if isinstance(meta.get("config"), dict) else None
    if have:
        cfg = have[0]["config"]
        arch = ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size", "tied_embeddings", "activation")
        if mcfg is not None and any(rows[cfg][f] != mcfg.get(f, rows[cfg][f]) for f in arch):
            fail(f"{path} was saved with a config that differs from config {cfg} of model \"{model}\"")
    elif mcfg is not None:
        named = meta.get("config_name")
        same = [c for c in [named, *standard, *rows]
                if c in rows and all(rows[c][f] == mcfg.get(f) for f, _ in fields)]
        cfg = same[0] if same else None
        if cfg is None and isinstance(named, str) and named and named not in rows:
            cols = [(f, t) for f, t in fields if f in mcfg]
            q(f"INSERT INTO llm_model_config (name, {', '.join(f for f, _ in cols)}, note) VALUES ("
              + ", ".join(f"${i + 1}" for i in range(len(cols) + 2)) + ")", ["text", *[t for _, t in cols], "text"],
              [named, *[mcfg[f] for f, _ in cols], f"imported from {path}"])
            cfg = named
            rows[cfg] = q("SELECT * FROM llm_model_config WHERE name = $1", ["text"], [cfg])[0]
        if cfg is None:
            fail(f"{path} names config {named!r}, which exists here with other values",
                 hint="Import client-side with pg-llm checkpoint import (picks or creates a config), or create "
                      "the model first with SELECT llm_model_create(name, config).")
    else:
        std = [(c, rows[c]["n_layer"], rows[c]["n_embd"], rows[c]["n_ctx"], rows[c]["vocab_size"])
               for c in standard if c in rows]
        cfg, sizes = infer_standard(shapes, std)
        if cfg is None:
            fail(f"{path}: {sizes}" if "wte.weight" not in shapes or "wpe.weight" not in shapes else
                 f"{path} has no config and its sizes ({sizes}) match no standard config",
                 hint=f"Create the model with its config first: SELECT llm_model_create('{model}', 'CONFIG') "
                      "(add the config with INSERT INTO llm_model_config ...), then import into it.")
    c = rows[cfg]
    expected = {r["name"]: tuple(r["shape"]) for r in
                q("SELECT p.name, p.shape FROM llm_param_names($1) WITH ORDINALITY AS p(name, shape, k) ORDER BY p.k",
                  ["text"], [cfg])}
    problems = shape_problems(expected, shapes, c["tied_embeddings"])
    if problems:
        fail(f"{path} does not match config {cfg} (n_layer={c['n_layer']}, n_embd={c['n_embd']}, "
             f"n_ctx={c['n_ctx']}, vocab_size={c['vocab_size']}): " + " | ".join(problems) + "; nothing was written")
    for name in [*expected, *(["lm_head.weight"] if "lm_head.weight" in params and c["tied_embeddings"] else [])]:
        a = npz_array(z, params[name])
        if not np.isfinite(a).all():
            fail(f"{path}: tensor {name!r} has {int((~np.isfinite(a)).sum())} NaN/Inf value(s) (after conversion "
                 "to float32); nothing was written")
        if name == "lm_head.weight" and not np.array_equal(a, npz_array(z, params["wte.weight"])):
            fail(f"{path}: lm_head.weight differs from wte.weight but config {cfg} ties them; nothing was written")
    # ---- only a new config row was written above this line (rolled back like the rest on error) ----
    if not have:
        q("SELECT llm_model_create($1, $2, $3)", ["text", "text", "text"], [model, cfg, f"imported from {path}"])
    create = plpy.prepare("SELECT llm_tensor_create($1, $2, NULL, 'param', $3) AS id", ["text", "int[]", "text"])
    tile = plpy.prepare("SELECT tile FROM llm_tensor WHERE id = $1", ["bigint"])
    put = plpy.prepare("INSERT INTO llm_tile (tensor_id, tr, tc, data) SELECT $1, u.tr, u.tc, u.data "
                       "FROM unnest($2::INT[], $3::INT[], $4::BYTEA[]) AS u(tr, tc, data)",
                       ["bigint", "int[]", "int[]", "bytea[]"])
    total = 0
    for name, shape in expected.items():
        a = npz_array(z, params[name])
        m = a.reshape(1, -1) if a.ndim == 1 else a
        tid = plpy.execute(create, [name, list(shape), model])[0]["id"]
        th, tw = plpy.execute(tile, [tid])[0]["tile"]
        batch = ([], [], [])
        for tr in range(-(-m.shape[0] // th)):
            for tc in range(-(-m.shape[1] // tw)):
                batch[0].append(tr)
                batch[1].append(tc)
                batch[2].append(np.ascontiguousarray(m[tr * th:(tr + 1) * th, tc * tw:(tc + 1) * tw], "<f4").tobytes())
                if len(batch[0]) * th * tw >= 2 ** 22:  # ~16 MiB per INSERT
                    plpy.execute(put, [tid, *batch])
                    batch = ([], [], [])
        if batch[0]:
            plpy.execute(put, [tid, *batch])
        total += a.size
    q("SELECT (llm_model_check($1, TRUE)).name", ["text"], [model])
    return total


def server_export(plpy, path, model, compressed):
    """pg_llm_export_npz: the parameters under pg_llm's names, float32, the file replaced atomically."""
    def q(sql, types, args):
        return plpy.execute(plpy.prepare(sql, types), args)

    q("SELECT llm_server_file_check($1, TRUE, 'pg_llm_export_npz')", ["text"], [path])
    cfg = q("SELECT (llm_model_check($1)).name AS c", ["text"], [model])[0]["c"]
    tensors = q("SELECT p.name, v.id, v.shape, v.tile FROM llm_param_names($1) WITH ORDINALITY AS p(name, shape, k) "
                "JOIN llm_tensor AS v ON v.model = $2 AND v.name = p.name AND v.role = 'param' AND v.id > 0 "
                "ORDER BY p.k", ["text", "text"], [cfg, model])
    tiles = plpy.prepare("SELECT tr, tc, data FROM llm_tile WHERE tensor_id = $1", ["bigint"])
    tmp = f"{path}.partial-{os.getpid()}"
    total = 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED,
                             allowZip64=True) as zf:
            for t in tensors:
                shape, (th, tw) = list(t["shape"]), t["tile"]
                rows, cols = (1, shape[0]) if len(shape) == 1 else shape
                a = np.empty((rows, cols), dtype=np.float32)
                for r in plpy.cursor(tiles, [t["id"]]):
                    r0, c0 = r["tr"] * th, r["tc"] * tw
                    h, w = min(th, rows - r0), min(tw, cols - c0)
                    a[r0:r0 + h, c0:c0 + w] = np.frombuffer(r["data"], dtype="<f4").reshape(h, w)
                npz_write(zf, t["name"], a.reshape(shape))
                total += a.size
        os.replace(tmp, path)
    except OSError as e:
        plpy.error(f"pg_llm: pg_llm_export_npz: cannot write {path} on the database server ({e})",
                   hint="The path is written by the server process; for a file on your machine use "
                        "pg-llm model export.", sqlstate="58030")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return total
