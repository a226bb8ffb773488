"""pg_llm_import_npz(path, model) / pg_llm_export_npz(path, model): GPT-2 weights as .npz files read and
written by the PostgreSQL server process itself (the names a playbook calls).

Server-side file access is COPY's rule: superusers and members of pg_read_server_files (import) or
pg_write_server_files (export) only; anyone else gets a clear error pointing at the client-side
`pg-llm model import/export`, which streams the file over the connection instead. Relative paths are
relative to the data directory, and files are created with the server's umask, like COPY TO.

These are PL/Python, not tensor microkernels: the server must open the file, so numpy's .npz reader/writer
runs inside the backend (py/kernels/npz_server.py). The rules are the client's, by construction: both import
pg_llm.kernels.npz (name normalization, .npz opening incl. compressed and gzip-wrapped archives, standard
config inference by shapes, the name/shape check), and expected shapes come from llm_param_names.

Import: one transaction, everything checked (names, shapes, NaN/Inf, tied lm_head = wte) before anything is
written. The model is created with the config of a pg_llm checkpoint file's metadata, else the standard
config its shapes match (a GPT-2 124M .npz becomes 'gpt2-small'); for other sizes create the model first
(SELECT llm_model_create('m', 'my-config')) and import into it: an existing model without tensors keeps
its config. A model that already has tensors is refused. Optimizer state in the file is ignored (weights
only; pg-llm checkpoint import restores it). Export writes the parameters under pg_llm's names
(wte.weight, h.0.attn.c_attn.weight, ...; Conv1D [in, out]), uncompressed unless compressed => TRUE.
"""
from __future__ import annotations

from dataclasses import fields

from pg_llm.config import STANDARD, GPT2Config
from pg_llm.gen.emit import comment, function, kernel_body, plpgsql
from pg_llm.kernels.npz_server import server_export, server_import

SQL_FILE = "api/npz.sql"
ORDER = 79

PG_TYPES = {int: "int", float: "float8", bool: "boolean", str: "text"}
FIELDS = tuple((f.name, PG_TYPES[type(f.default)]) for f in fields(GPT2Config))  # (column, type)


def _check() -> str:
    body = plpgsql("v_ok BOOLEAN; v_role TEXT;", """
        v_role := CASE WHEN p_write THEN 'pg_write_server_files' ELSE 'pg_read_server_files' END;
        v_ok := (
          @ok
        );
        IF NOT coalesce(v_ok, FALSE) THEN
          RAISE EXCEPTION 'pg_llm: %: permission denied to % the server file "%"', p_caller,
            CASE WHEN p_write THEN 'write' ELSE 'read' END, p_path
            USING ERRCODE = 'insufficient_privilege',
              DETAIL = format('%s opens the file in the PostgreSQL server process; like COPY with a file name, '
                              'that is allowed to superusers and members of %s only (role "%s" is neither).',
                              p_caller, v_role, current_user),
              HINT = CASE WHEN p_write THEN 'Export on your machine instead: pg-llm model export --name MODEL OUT_DIR '
                                          '(or pg-llm checkpoint export --model MODEL OUT.npz).'
                     ELSE 'Import from your machine instead: pg-llm model import --name MODEL PATH.npz (the file is '
                          'read client-side and sent over the connection), or have an administrator GRANT '
                          'pg_read_server_files.' END;
        END IF;
    """, ok="SELECT r.rolsuper OR pg_has_role(current_user, v_role, 'USAGE') FROM pg_roles AS r "
            "WHERE r.rolname = current_user")
    out = [function("llm_server_file_check", "p_path TEXT, p_write BOOLEAN, p_caller TEXT", "VOID", body,
                    volatility="STABLE", note="COPY's rule for server-side files: superuser, or member of "
                    "pg_read_server_files (read) / pg_write_server_files (write); else a clear error.")]
    body = plpgsql("v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT;", """
        v_msg := regexp_replace(p_msg, '^[A-Za-z_.]+: (pg_llm: )', '\\1');
        v_detail := nullif(p_detail, '');
        v_hint := nullif(p_hint, '');
        IF v_detail IS NOT NULL AND v_hint IS NOT NULL THEN
          RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = p_state;
        ELSIF v_hint IS NOT NULL THEN
          RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = p_state;
        ELSIF v_detail IS NOT NULL THEN
          RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = p_state;
        END IF;
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = p_state;
    """)
    out.append(function("llm_reraise", "p_msg TEXT, p_detail TEXT, p_hint TEXT, p_state TEXT", "VOID", body,
                        note="Re-raise an error caught from PL/Python without its Python class prefix "
                        "('plpy.Error: pg_llm: ...' becomes 'pg_llm: ...'), keeping detail, hint and SQLSTATE."))
    return "\n".join(out)


def _functions() -> str:
    std = repr(tuple(STANDARD))
    out = [function("llm_npz_import", "path TEXT, model TEXT", "BIGINT",
                    kernel_body(server_import, f"server_import(plpy, path, model, {FIELDS!r}, {std})"),
                    language="plpython3u", settings=("jit = off",),
                    note="Worker of pg_llm_import_npz (same permission check; errors carry PL/Python's prefix).")]
    out.append(function("llm_npz_export", "path TEXT, model TEXT, compressed BOOLEAN", "BIGINT",
                        kernel_body(server_export, "server_export(plpy, path, model, compressed)"),
                        language="plpython3u", settings=("jit = off",),
                        note="Worker of pg_llm_export_npz (same permission check)."))
    catch = """
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
            v_state = RETURNED_SQLSTATE;
          PERFORM llm_reraise(v_msg, v_detail, v_hint, v_state);
          RETURN NULL;"""
    declare = "v_msg TEXT; v_detail TEXT; v_hint TEXT; v_state TEXT;"
    out.append(function("pg_llm_import_npz", "path TEXT, model TEXT", "BIGINT",
                        plpgsql(declare, "RETURN llm_npz_import(path, model);" + catch),
                        settings=("jit = off",), note="Import GPT-2 weights from an .npz file ON THE DATABASE SERVER "
                        "as model `model` (superuser or pg_read_server_files; client-side: pg-llm model import). "
                        "Stored or deflated zip (np.savez / np.savez_compressed) or gzip-wrapped; names with or "
                        "without 'transformer.'; checked like the client import; one transaction. Config: an "
                        "existing empty model's, else the file's pg_llm metadata, else the standard config its "
                        "shapes match. Returns the number of parameters."))
    out.append(function("pg_llm_export_npz", "path TEXT, model TEXT, compressed BOOLEAN DEFAULT FALSE", "BIGINT",
                        plpgsql(declare, "RETURN llm_npz_export(path, model, compressed);" + catch),
                        settings=("jit = off",), note="Write a model's parameters to an .npz file ON THE DATABASE "
                        "SERVER (superuser or pg_write_server_files; client-side: pg-llm model export), pg_llm "
                        "names, float32, replacing the file atomically. Returns the number of parameters."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _check(), _functions()])
