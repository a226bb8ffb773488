"""Roles, grants and row-level security: what each pg_llm role may call, read and write (docs/access.md).

PUBLIC gets nothing: no EXECUTE on any pg_llm function, no access to its tables. llm_reader runs inference and
reads every table; llm_trainer (a reader too) also creates models, configs, datasets and checkpoints, and
trains those it owns or was granted (llm_model_grant); llm_admin (a trainer too) may change everything.
Every function runs with its caller's rights (none is SECURITY DEFINER except the BPE cache fill, which
computes what it stores), so calling an internal function directly grants nothing the caller's role lacks:
row-level security on the tables below decides which rows a statement may change, whichever function sends it.
Superusers and the tables' owner (who installed pg_llm) bypass row-level security, as PostgreSQL defines.
"""
from __future__ import annotations

from pg_llm.gen.emit import EXTSCHEMA, comment
from pg_llm.gen.sqlfmt import raw_ddl, sql
from pg_llm.gen.surface import ADMIN_ROLE, INTERNAL, PUBLIC, READER_ROLE, TRAINER_ROLE

SQL_FILE = "api/privileges.sql"
ORDER = 99  # after every object it grants on

R, T, A = READER_ROLE, TRAINER_ROLE, ADMIN_ROLE
WRITABLE = "(SELECT w.name FROM llm_writable_models() AS w)"  # uncorrelated: one evaluation per statement
OWNS = "llm_may_own({t}.owner)"
MINE = "pg_has_role({t}.owner, 'USAGE')"  # a new row must be the caller's own (or its group's)

# table -> {role: privileges}; every pg_llm relation is listed (a test checks), so none is forgotten.
TABLES: dict[str, dict[str, str]] = {
    "llm_tensor": {R: "SELECT, INSERT, UPDATE, DELETE"},
    "llm_tile": {R: "SELECT, INSERT, UPDATE, DELETE"},
    f"{INTERNAL}.llm_tape": {R: "SELECT, INSERT, UPDATE, DELETE"},
    f"{INTERNAL}.llm_tape_grad": {R: "SELECT, INSERT, UPDATE, DELETE"},
    "llm_model": {R: "SELECT", T: "INSERT, DELETE, UPDATE (step, note)"},
    "llm_model_grant": {R: "SELECT", T: "INSERT, DELETE"},
    "llm_model_config": {R: "SELECT", T: "INSERT, UPDATE, DELETE"},
    "llm_checkpoint": {R: "SELECT", T: "INSERT, DELETE, UPDATE (note)"},
    "llm_train_log": {R: "SELECT", T: "INSERT, UPDATE, DELETE"},
    "llm_train_job": {R: "SELECT", T: "INSERT, UPDATE, DELETE"},
    "llm_dataset_source": {R: "SELECT", T: "INSERT, UPDATE, DELETE"},
    "llm_dataset": {R: "SELECT", T: "INSERT, UPDATE, DELETE"},
    "llm_tokenizer": {R: "SELECT", A: "INSERT, UPDATE, DELETE"},
    "llm_bpe_vocab": {R: "SELECT", A: "INSERT, UPDATE, DELETE"},
    "llm_bpe_merges": {R: "SELECT", A: "INSERT, UPDATE, DELETE"},
    "llm_bpe_cache": {R: "SELECT", A: "DELETE"},  # filled by llm_bpe_cache_fill (SECURITY DEFINER) only
    # registering ranks is for admins; readers route inference to them (host, port and dbname are in
    # pg_foreign_server's options anyway, which every role reads; passwords only in user mappings)
    "llm_cluster_rank": {R: "SELECT", A: "INSERT, UPDATE, DELETE"},
    f"{INTERNAL}.llm_cluster_verified": {R: "SELECT, INSERT, UPDATE, DELETE"},  # a role's own rows (policy)
    f"{INTERNAL}.llm_cluster_tile_md5": {R: "SELECT"},  # what a coordinator reads from a rank
    # data-parallel training (api/cluster_train*.py): a rank's gradient shares (its peers read them), the
    # coordinator's verified rank versions and commit decisions (a role's own rows)
    f"{INTERNAL}.llm_dp_grad": {R: "SELECT", T: "INSERT, DELETE"},
    f"{INTERNAL}.llm_dp_state": {R: "SELECT, INSERT, UPDATE, DELETE"},
    f"{INTERNAL}.llm_dp_decision": {R: "SELECT", T: "INSERT, DELETE"},
    "llm_py_module": {},  # SELECT to PUBLIC (py/gen/pymodules.py); its code runs in every role's kernels
    **{v: {R: "SELECT"} for v in ("llm_tensors", "llm_models", "llm_tokenizers", "llm_datasets", "llm_checkpoints",
                                  "llm_param", "llm_param_rows", "llm_train_progress")},
    "llm_cluster_ranks": {R: "SELECT"},
}

# Scratch tensors (negative ids) belong to the backend that made them (a dead backend's are anyone's to drop);
# durable ones to their model (or, free-standing, to their owner).
SCRATCH = "{t}.id < 0 AND ({t}.backend_pid = pg_backend_pid() OR NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a " \
          "WHERE a.pid = {t}.backend_pid))"
DURABLE = "{t}.id > 0 AND CASE WHEN {t}.model = '' THEN llm_may_own({t}.owner) ELSE {t}.model IN " + WRITABLE + " END"
TILE = "EXISTS (SELECT 1 FROM llm_tensor AS t WHERE t.id = llm_tile.tensor_id AND {cond})"

VERIFIED_MINE = "llm_cluster_verified.owner = CURRENT_USER::TEXT::REGROLE"
MINE_OF = "{t}.owner = CURRENT_USER::TEXT::REGROLE"
# (table, policy, command, role, USING, WITH CHECK); reads are open: every table gets a SELECT policy for R.
POLICIES = [
    ("llm_tensor", "scratch", "ALL", R, SCRATCH.format(t="llm_tensor"),
     "llm_tensor.id < 0 AND llm_tensor.backend_pid = pg_backend_pid()"),
    ("llm_tensor", "durable", "ALL", T, DURABLE.format(t="llm_tensor"), DURABLE.format(t="llm_tensor")),
    ("llm_tile", "scratch", "ALL", R,
     "llm_tile.tensor_id < 0 AND " + TILE.format(cond="t.backend_pid = pg_backend_pid()"), None),
    ("llm_tile", "durable", "ALL", T, "llm_tile.tensor_id > 0 AND " + TILE.format(cond=DURABLE.format(t="t")), None),
    ("llm_model", "create", "INSERT", T, None, MINE.format(t="llm_model")),
    ("llm_model", "train", "UPDATE", T, "llm_model.name IN " + WRITABLE, None),
    ("llm_model", "drop", "DELETE", T, OWNS.format(t="llm_model"), None),
    ("llm_model_grant", "owner", "ALL", T, "EXISTS (SELECT 1 FROM llm_model AS m WHERE m.name = llm_model_grant.model "
     "AND llm_may_own(m.owner))", None),
    ("llm_model_config", "create", "INSERT", T, None, MINE.format(t="llm_model_config")),
    ("llm_model_config", "change", "UPDATE", T, OWNS.format(t="llm_model_config"), None),
    ("llm_model_config", "drop", "DELETE", T, OWNS.format(t="llm_model_config"), None),
    ("llm_checkpoint", "save", "INSERT", T, None, MINE.format(t="llm_checkpoint") + " AND llm_checkpoint.model IN "
     + WRITABLE),
    ("llm_checkpoint", "change", "UPDATE", T, "llm_checkpoint.store IN " + WRITABLE, None),
    ("llm_checkpoint", "drop", "DELETE", T, "llm_checkpoint.store IN " + WRITABLE, None),
    ("llm_train_log", "train", "ALL", T, "llm_train_log.model IN " + WRITABLE, None),
    ("llm_train_job", "train", "ALL", T, "llm_train_job.model IN " + WRITABLE, None),
    ("llm_dataset_source", "create", "INSERT", T, None, MINE.format(t="llm_dataset_source")),
    ("llm_dataset_source", "change", "UPDATE", T, OWNS.format(t="llm_dataset_source"), None),
    ("llm_dataset_source", "drop", "DELETE", T, OWNS.format(t="llm_dataset_source"), None),
    ("llm_dataset", "owner", "ALL", T, "EXISTS (SELECT 1 FROM llm_dataset_source AS s WHERE s.dataset = "
     "llm_dataset.dataset AND s.source_hash = llm_dataset.source_hash AND llm_may_own(s.owner))", None),
    # the checks a role's inference fan-out trusts are its own (api/cluster_infer.py)
    (f"{INTERNAL}.llm_cluster_verified", "own", "ALL", R, VERIFIED_MINE, VERIFIED_MINE),
    # a cluster step writes gradient shares of models the role trains, and its own state and decisions
    (f"{INTERNAL}.llm_dp_grad", "train", "ALL", T, "llm_dp_grad.model IN " + WRITABLE, None),
    (f"{INTERNAL}.llm_dp_state", "own", "ALL", R, MINE_OF.format(t="llm_dp_state"), MINE_OF.format(t="llm_dp_state")),
    (f"{INTERNAL}.llm_dp_decision", "own", "ALL", T, MINE_OF.format(t="llm_dp_decision"),
     MINE_OF.format(t="llm_dp_decision")),
]
RLS_TABLES = sorted({p[0] for p in POLICIES})


def _expr(text: str) -> str:
    """A policy expression, parse-checked and pretty-printed by sqlglot (as the select list of a SELECT)."""
    return sql("SELECT " + text).removeprefix("SELECT").strip()


def _roles() -> str:
    made = "\n".join(f"""  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{r}') THEN
    CREATE ROLE {r} NOLOGIN;
  END IF;""" for r in (R, T, A))
    return (comment("The three roles (cluster-wide, so they may exist already: another database's pg_llm).") + "\n"
            f"DO $do$\nBEGIN\n{made}\nEND\n$do$;\n\n"
            + raw_ddl(f"GRANT {R} TO {T}") + ";\n" + raw_ddl(f"GRANT {T} TO {A}") + ";\n")


def _functions() -> str:
    public = ",\n    ".join(", ".join(f"'{n}'" for n in sorted(PUBLIC)[i:i + 6]) for i in range(0, len(PUBLIC), 6))
    return comment("""EXECUTE on pg_llm's functions (the API in its schema, every function of the internal schema):
    not PUBLIC's (a function's default), the reader role's (so every pg_llm role's).""") + f"""
DO $do$
DECLARE
  f REGPROCEDURE;
BEGIN
  FOR f IN SELECT p.oid FROM pg_catalog.pg_proc AS p
           WHERE p.pronamespace = '{INTERNAL}'::REGNAMESPACE
              OR (p.pronamespace = '{EXTSCHEMA}'::REGNAMESPACE AND p.proname = ANY (ARRAY[
    {public}]::NAME[])) LOOP
    EXECUTE pg_catalog.format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', f);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON ROUTINE %s TO {R}', f);
  END LOOP;
END
$do$;

""" + "".join(raw_ddl(f"GRANT USAGE ON SCHEMA {s} TO {R}") + ";\n" for s in (INTERNAL, EXTSCHEMA))


def _tables() -> str:
    out = [comment("Table privileges by role; row-level security below narrows the writes to rows of one's own.")]
    for table, grants in TABLES.items():
        out += [raw_ddl(f"GRANT {privs} ON {table} TO {role}") + ";" for role, privs in grants.items()]
    out.append(raw_ddl(f"GRANT USAGE ON SEQUENCE llm_tensor_scratch_id, {INTERNAL}.llm_tape_seq TO {R}") + ";")
    for schema in (EXTSCHEMA, INTERNAL):
        out.append(raw_ddl(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {T}") + ";")
    return "\n".join(out) + "\n"


def _policies() -> str:
    out = [comment("Row-level security: anyone with the reader role reads every row; writes need a policy.")]
    for table in RLS_TABLES:
        out.append(raw_ddl(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY") + ";")
        out.append(raw_ddl(f"CREATE POLICY may_read ON {table} FOR SELECT TO {R} USING (true)") + ";")
    for table, name, cmd, role, using, check in POLICIES:
        # ALL would apply to SELECT too, OR-ed with the reader's USING (true): reads then paid for the write
        # rule (measured: llm_logits as a reader 1.34x the owner's); so one policy per writing command
        for c in ("INSERT", "UPDATE", "DELETE") if cmd == "ALL" else (cmd,):
            text = f"CREATE POLICY may_{name}{'_' + c.lower() if cmd == 'ALL' else ''} ON {table} FOR {c} TO {role}"
            text += f"\n  USING ({_expr(using)})" if using and c != "INSERT" else ""
            text += f"\n  WITH CHECK ({_expr(check or using)})" if c != "DELETE" and (check or c == "INSERT") else ""
            out.append(text + ";")
    return "\n\n".join(out) + "\n"


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _roles(), _functions(), _tables(), _policies()])
