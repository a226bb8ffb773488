"""Who may change what: every model, config, checkpoint, dataset and free-standing tensor has an owner (the role
that made it); a model's owner may let other roles train it (llm_model_grant). Reading is open to every
pg_llm role. The rules are enforced twice: the API checks them first, for a clear error before anything is
written (llm_model_writable), and row-level security on the tables (py/api/privileges.py) holds them for any
statement, whichever function or client sends it. Roles: docs/access.md.
"""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import ADMIN_ROLE

SQL_FILE = "api/access.sql"
ORDER = 79  # after llm_checkpoint (llm_writable_models reads it)


def _table() -> str:
    return stmt("""
        CREATE TABLE llm_model_grant (
          model TEXT NOT NULL REFERENCES llm_model (name) ON DELETE CASCADE,
          grantee REGROLE NOT NULL,
          granted_by REGROLE NOT NULL DEFAULT CURRENT_USER::TEXT::REGROLE,
          granted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          PRIMARY KEY (model, grantee)
        )""", "Roles that may train a model they do not own (llm_model_grant / llm_model_revoke).")


def _predicates() -> str:
    admin = function("llm_is_admin", "", "BOOLEAN", f"SELECT pg_has_role('{ADMIN_ROLE}', 'USAGE')",
                     language="sql", volatility="STABLE",
                     note=f"Members of {ADMIN_ROLE} (and superusers) may change everything.")
    own = function("llm_may_own", "p_owner REGROLE", "BOOLEAN",
                   "SELECT pg_has_role(p_owner, 'USAGE') OR llm_is_admin()", language="sql", volatility="STABLE",
                   note="The current role acts as p_owner: it is that role, a member of it, or an admin.")
    models = function("llm_writable_models", "", "TABLE(name TEXT)", """
        SELECT m.name FROM llm_model AS m
        WHERE llm_may_own(m.owner)
          OR EXISTS (SELECT 1 FROM llm_model_grant AS g WHERE g.model = m.name AND pg_has_role(g.grantee, 'USAGE'))
        UNION ALL
        SELECT c.store FROM llm_checkpoint AS c
        WHERE llm_may_own(c.owner) OR EXISTS (SELECT 1 FROM llm_model AS m WHERE m.name = c.model
                                              AND llm_may_own(m.owner))""", language="sql", volatility="STABLE",
        note="What the current role may write under llm_tensor.model: the models it owns or was granted, and the "
             "stores of the checkpoints it saved or of its models. Row-level policies call it once per statement "
             "(an uncorrelated IN list), not once per row.")
    return "\n".join([admin, own, models])


def _writable() -> str:
    body = plpgsql("v_owner REGROLE;", """
        v_owner := (SELECT m.owner FROM llm_model AS m WHERE m.name = p_model);
        IF v_owner IS NULL THEN
          RETURN;  -- unknown model: the caller's own lookup says so, with the known names
        END IF;
        IF p_owner_only AND NOT llm_may_own(v_owner) THEN
          RAISE EXCEPTION 'pg_llm: %: model "%" belongs to role %', p_action, p_model, v_owner
            USING HINT = 'Only its owner (or a member of llm_admin) may do this.';
        END IF;
        IF NOT p_owner_only AND NOT p_model IN (SELECT w.name FROM llm_writable_models() AS w) THEN
          RAISE EXCEPTION 'pg_llm: %: role % may not change model "%" (it belongs to %)', p_action, current_user,
            p_model, v_owner
            USING HINT = format('Ask %s to run SELECT llm_model_grant(%L, %L), or work on a model of your own.',
                                v_owner, p_model, current_user);
        END IF;
    """)
    return function("llm_model_writable", "p_model TEXT, p_action TEXT, p_owner_only BOOLEAN DEFAULT FALSE",
                    "VOID", body, volatility="STABLE",
                    note="Raise a clear error unless the current role may change model p_model (train it, load "
                         "a checkpoint into it; p_owner_only: drop it, grant it).")


# Readers see whole training steps (tests/test_train_readers.py): a forward reads a model's weights in many
# statements, each with a fresh snapshot under READ COMMITTED, so a step committing in between would mix two
# steps. Forwards hold a shared advisory lock on the model until their transaction ends; a step takes it
# exclusively just before it commits (waiting for forwards in flight, holding new ones for milliseconds).
LOCK_KEY = "hashtextextended('pg_llm model ' || p_model, 0)"  # 64 bits: two models never share a lock


def _locks() -> str:
    read = function("llm_model_read_lock", "p_model TEXT", "VOID",
                    f"SELECT pg_advisory_xact_lock_shared({LOCK_KEY})", language="sql",
                    note="Taken by every forward: no training step of p_model commits until this transaction ends.")
    write = function("llm_model_write_lock", "p_model TEXT", "VOID",
                     f"SELECT pg_advisory_xact_lock({LOCK_KEY})", language="sql",
                     note="Taken by a training step (or a checkpoint load) before its commit: waits for the "
                          "forwards reading p_model in other sessions, and holds new ones until it commits.")
    return "\n".join([read, write])


def _grant() -> str:
    body = plpgsql("v_role REGROLE;", """
        PERFORM llm_model_get(p_model);
        PERFORM llm_model_writable(p_model, 'llm_model_grant', TRUE);
        v_role := to_regrole(p_role);
        IF v_role IS NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_model_grant: no role "%"', p_role
            USING HINT = 'Name an existing role (SELECT rolname FROM pg_roles); roles are created with CREATE ROLE.';
        END IF;
        INSERT INTO llm_model_grant AS g (model, grantee) VALUES (p_model, v_role) ON CONFLICT DO NOTHING;
        RETURN v_role;
    """)
    out = [function("llm_model_grant", "p_model TEXT, p_role TEXT", "REGROLE", body,
                    note="Let role p_role train model p_model (steps, checkpoints, loading weights into it). "
                         "Only the model's owner or an admin may grant; dropping the model stays the owner's.")]
    body = plpgsql("v_n BIGINT;", """
        PERFORM llm_model_get(p_model);
        PERFORM llm_model_writable(p_model, 'llm_model_revoke', TRUE);
        DELETE FROM llm_model_grant AS g WHERE g.model = p_model AND g.grantee = to_regrole(p_role);
        GET DIAGNOSTICS v_n = ROW_COUNT;
        RETURN v_n > 0;
    """)
    out.append(function("llm_model_revoke", "p_model TEXT, p_role TEXT", "BOOLEAN", body,
                        note="Take back llm_model_grant; true when p_role had been granted the model."))
    return "\n".join(out)


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _table(), _predicates(), _writable(), _locks(), _grant()])
