-- Who may do what: server files are COPY's rule (superuser, pg_read/write_server_files); every function pins
-- its search_path (the only ones without a SET clause are inlinable SQL naming every operator by schema).
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT p.proname FROM pg_proc AS p
WHERE p.pronamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace) AND p.proname LIKE 'llm%'
  AND p.prokind = 'f' AND p.proconfig IS NULL ORDER BY 1;
SELECT count(*) > 150 AS pinned FROM pg_proc AS p
WHERE p.pronamespace IN ('public'::regnamespace, 'llm_internal'::regnamespace) AND p.proname LIKE 'llm%'
  AND 'search_path=pg_catalog, public, llm_internal, pg_temp' = ANY(p.proconfig);
-- nothing for PUBLIC: a role needs one of pg_llm's roles to call it
CREATE ROLE regress_pg_llm_nobody;
SET ROLE regress_pg_llm_nobody;
SELECT llm_encode('hi');
RESET ROLE;
DROP ROLE regress_pg_llm_nobody;
CREATE ROLE regress_pg_llm_plain IN ROLE llm_trainer;
INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size)
VALUES ('regress-priv', 1, 2, 16, 8, 301);
SELECT m.name, m.config FROM llm_model_create('p', 'regress-priv') AS m;
SET ROLE regress_pg_llm_plain;
SELECT pg_llm_export_npz('/tmp/regress-pg-llm.npz', 'p');
SELECT pg_llm_import_npz('/tmp/regress-pg-llm.npz', 'p');
RESET ROLE;
DROP ROLE regress_pg_llm_plain;
