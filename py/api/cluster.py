"""A cluster of ranks on the coordinator (docs/scaleout.md): registered in llm_cluster_rank, reached through
PL/Proxy (one SQL/MED server per cluster, a partition per rank) to call functions on ranks, and through
postgres_fdw (a server per rank, foreign tables in the internal schema) to move tiles.

PL/Proxy maps a hash to a partition with `hash & (n - 1)` and its validator refuses a partition count that is
not a power of two (plproxy src/cluster.c check_valid_partcount, doc/config.md); the packaged 2.10 adds the
cluster option modular_mapping, `abs(hash % n)`, for any n. Every cluster is defined with modular_mapping '1',
partition p<r> = rank r, and functions run on ranks with `SPLIT p_ranks; RUN ON p_ranks`: a rank number is its
own hash, so 3 ranks are 3 partitions, no padding, and each rank is called once. Rank numbers are 0..n-1 in
the order of llm_cluster_add; a cluster is dropped whole.

pg_llm does not require plproxy or postgres_fdw: the cluster functions check for them (llm_cluster_require)
and create the PL/Proxy functions (LANGUAGE plproxy) the first time a rank is registered.
"""
from __future__ import annotations

from pg_llm.api.cluster_check import inspect
from pg_llm.api.cluster_infer import PROXIES as INFER_PROXIES
from pg_llm.api.cluster_rank import INFO_COLS
from pg_llm.api.cluster_sync import sync
from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import ADMIN_ROLE, INTERNAL, OWNER, READER_ROLE

SQL_FILE = "api/cluster.sql"
ORDER = 91

NAME_RE = "^[a-z][a-z0-9_]{0,39}$"  # server and foreign table names are derived from it (63-byte identifiers)
# (proxy name, arguments after p_cluster, returns, rank-side function[, the arguments SPLIT: p_ranks when not
# given]); the inference proxies (api/cluster_infer.py) are appended: one mechanism creates them all.
PROXIES: tuple[tuple[str, ...], ...] = (
    ("llm_cluster_px_info", "p_ranks INT[], p_model TEXT, p_config JSONB, p_sums BOOLEAN", f"TABLE({INFO_COLS})",
     "llm_cluster_rank_info(p_ranks, p_model, p_config, p_sums)"),
    ("llm_cluster_px_sums", "p_ranks INT[], p_model TEXT", "TABLE(rank INT, name TEXT, role TEXT, checksum TEXT)",
     "llm_cluster_rank_sums(p_ranks, p_model)"),
    ("llm_cluster_px_prepare", "p_ranks INT[], p_model TEXT, p_config JSONB, p_tensors JSONB",
     "TABLE(rank INT, name TEXT, role TEXT, id BIGINT)", "llm_cluster_rank_prepare(p_ranks, p_model, p_config, "
     "p_tensors)"),
) + INFER_PROXIES


def _table() -> str:
    return "\n".join([stmt(f"""
        CREATE TABLE llm_cluster_rank (
          cluster TEXT NOT NULL CHECK (cluster ~ '{NAME_RE}'),
          rank INT NOT NULL CHECK (rank >= 0),
          host TEXT,
          port INT CHECK (port BETWEEN 1 AND 65535),
          dbname TEXT NOT NULL CHECK (dbname <> ''),
          login TEXT NOT NULL,
          added_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          {OWNER},
          PRIMARY KEY (cluster, rank)
        )""", "The ranks of each cluster (llm_cluster_add): where a rank's database is and the role it is "
              "reached as. Passwords live in the user mappings only (pg_user_mappings hides them)."),
        stmt("""
        CREATE VIEW llm_cluster_ranks AS
        SELECT r.cluster, r.rank, r.host, r.port, r.dbname, r.login AS "user",
               llm_cluster_conninfo(r.host, r.port, r.dbname) AS conninfo, 'llm_rank_' || r.cluster || '_' || r.rank
               AS fdw_server, 'llm_cluster_' || r.cluster AS plproxy_server, r.added_at, r.owner
        FROM llm_cluster_rank AS r""", "Every registered rank: its conninfo (without password) and the "
                                       "postgres_fdw and PL/Proxy servers that reach it.")])


def _helpers() -> str:
    require = plpgsql("v_missing TEXT;", """
        v_missing := (SELECT string_agg(e.name, ', ' ORDER BY e.name) FROM unnest(ARRAY['plproxy', 'postgres_fdw'])
                      AS e(name) WHERE NOT EXISTS (SELECT 1 FROM pg_extension AS x WHERE x.extname = e.name));
        IF v_missing IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: a cluster needs the extension(s) % in the coordinator database', v_missing
            USING HINT = 'CREATE EXTENSION plproxy; CREATE EXTENSION postgres_fdw; (Debian: apt-get install '
                         'postgresql-15-plproxy; make setup installs it.)';
        END IF;
    """)
    out = [function("llm_cluster_require", "", "VOID", require, volatility="STABLE",
                    note="A clear error unless plproxy and postgres_fdw are installed here.")]
    out.append(function("llm_cluster_conninfo", "p_host TEXT, p_port INT, p_dbname TEXT", "TEXT", """
        SELECT concat_ws(' ', 'host=' || llm_conninfo_quote(p_host), 'port=' || llm_conninfo_quote(p_port::TEXT),
                         'dbname=' || llm_conninfo_quote(p_dbname))""", language="sql", volatility="IMMUTABLE",
        note="A rank's libpq conninfo (PL/Proxy partition), every value quoted; role and password come from "
             "the user mapping."))
    out.append(function("llm_cluster_server", "p_cluster TEXT", "TEXT", "SELECT 'llm_cluster_' || p_cluster",
                        language="sql", volatility="IMMUTABLE",
                        note="The PL/Proxy SQL/MED server (cluster) of a pg_llm cluster."))
    known = "SELECT coalesce(string_agg(DISTINCT r.cluster, ', '), '(none)') FROM llm_cluster_rank AS r"
    body = plpgsql("v_ranks INT[]; v_known TEXT;", """
        v_ranks := ARRAY(SELECT r.rank FROM llm_cluster_rank AS r WHERE r.cluster = p_cluster ORDER BY r.rank);
        IF cardinality(v_ranks) = 0 THEN
          v_known := (
            @known
          );
          RAISE EXCEPTION 'pg_llm: unknown cluster "%"', p_cluster
            USING HINT = format('Known clusters: %s. Register ranks with SELECT llm_cluster_add(%L, host, port, '
                                'dbname) or pg-llm cluster up --ranks N --name %s.', v_known, p_cluster, p_cluster);
        END IF;
        RETURN v_ranks;
    """, known=known)
    out.append(function("llm_cluster_ranks_of", "p_cluster TEXT", "INT[]", body, volatility="STABLE",
                        note="The rank numbers of a cluster (0..n-1), or a clear error for an unknown one."))
    return "\n".join(out)


def _proxy_sql() -> list[tuple[str, str, str]]:
    """(name, identity arguments, CREATE FUNCTION text) of each PL/Proxy function; '$px$'-quoted so it can be
    a literal inside a function body."""
    out = []
    for name, args, returns, target, *split in PROXIES:
        names = ", ".join(a.split()[0] for a in args.split(", "))
        body = (f"CLUSTER {INTERNAL}.llm_cluster_server(p_cluster);\nSPLIT {split[0] if split else 'p_ranks'};\n"
                f"RUN ON p_ranks;\nSELECT * FROM {INTERNAL}.{target};")
        assert names.startswith("p_ranks")
        text = function(name, f"p_cluster TEXT, {args}", returns, body, language="plproxy")
        text = text.replace("$fn$", "$px$").rstrip().removesuffix(";")
        types = ", ".join(["text", *(a.split()[1].lower().replace("int[]", "integer[]") for a in args.split(", "))])
        out.append((f"{INTERNAL}.{name}", types, text))
    return out


def _proxies() -> str:
    lines = []
    for name, types, text in _proxy_sql():
        src = text.split("$px$")[1]
        lit = "'" + text.replace("'", "''") + "'"
        proc = f"to_regprocedure('{name}({types})')"
        quoted = "'" + src.replace("'", "''") + "'"
        lines += [f"IF {proc} IS NULL",
                  f"   OR (SELECT p.prosrc FROM pg_proc AS p WHERE p.oid = {proc}) <> {quoted} THEN",
                  f"  EXECUTE {lit};",
                  f"  REVOKE ALL ON FUNCTION {name}({types}) FROM PUBLIC;",
                  f"  GRANT EXECUTE ON FUNCTION {name}({types}) TO {READER_ROLE};",
                  "END IF;"]
    body = plpgsql("", "\n".join(lines))
    return function("llm_cluster_proxies", "", "VOID", body,
                    note="Create the PL/Proxy functions the cluster API calls (they need LANGUAGE plproxy, which "
                    "pg_llm does not require at install), unless they exist as they are generated.")


def _add() -> str:
    body = plpgsql("v_login TEXT; v_rank INT; v_srv TEXT; v_fdw TEXT; v_opts TEXT; v_pw TEXT; r RECORD; "
                   "v_pre TEXT;", f"""
        PERFORM llm_cluster_require();
        IF cluster IS NULL OR cluster !~ '{NAME_RE}' THEN
          RAISE EXCEPTION 'pg_llm: invalid cluster name "%"', cluster
            USING HINT = 'A cluster name is 1 to 40 characters of a-z, 0-9 and _, starting with a letter.';
        END IF;
        IF coalesce(dbname, '') = '' OR port IS NOT NULL AND port NOT BETWEEN 1 AND 65535 THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_add: a rank needs a database name and a port in 1..65535, got % and %',
            dbname, port USING HINT = 'e.g. SELECT llm_cluster_add(''c'', ''10.0.0.2'', 5432, ''pg_llm'');';
        END IF;
        IF NOT pg_has_role('{ADMIN_ROLE}', 'MEMBER') THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_add: registering ranks is for members of {ADMIN_ROLE}'
            USING HINT = 'A superuser or a member of {ADMIN_ROLE} registers ranks (GRANT {ADMIN_ROLE} TO role).';
        END IF;
        v_login := coalesce(llm_cluster_add."user", current_user);
        IF EXISTS (SELECT 1 FROM llm_cluster_rank AS x WHERE x.cluster = llm_cluster_add.cluster
                   AND x.login <> v_login) THEN
          RAISE EXCEPTION 'pg_llm: every rank of cluster "%" is reached as one role, %, not %', cluster,
            (SELECT min(x.login) FROM llm_cluster_rank AS x WHERE x.cluster = llm_cluster_add.cluster), v_login
            USING HINT = 'PL/Proxy maps one role per cluster (its user mapping), not per partition: create that '
                         'role on every rank, or register these ranks as another cluster.';
        END IF;
        v_rank := (SELECT x.rank FROM llm_cluster_rank AS x WHERE x.cluster = llm_cluster_add.cluster
                   AND x.host IS NOT DISTINCT FROM llm_cluster_add.host AND x.port IS NOT DISTINCT FROM
                   llm_cluster_add.port AND x.dbname = llm_cluster_add.dbname);
        IF v_rank IS NOT NULL THEN
          RETURN v_rank;  -- registered already: idempotent
        END IF;
        v_rank := coalesce((SELECT max(x.rank) + 1 FROM llm_cluster_rank AS x
                            WHERE x.cluster = llm_cluster_add.cluster), 0);
        INSERT INTO llm_cluster_rank (cluster, rank, host, port, dbname, login)
        VALUES (cluster, v_rank, host, port, dbname, v_login);
        PERFORM llm_cluster_proxies();
        -- the PL/Proxy cluster: partition p<rank> per rank, modular_mapping for any count (see the file comment)
        v_srv := llm_cluster_server(cluster);
        IF v_rank = 0 THEN
          EXECUTE format('DROP SERVER IF EXISTS %I CASCADE', v_srv);
          EXECUTE format('CREATE SERVER %I FOREIGN DATA WRAPPER plproxy OPTIONS (modular_mapping %L, p0 %L)',
                         v_srv, '1', llm_cluster_conninfo(host, port, dbname));
          v_opts := format('user %L', v_login)
            || CASE WHEN password IS NULL THEN '' ELSE format(', password %L', password) END;
          EXECUTE format('CREATE USER MAPPING FOR CURRENT_USER SERVER %I OPTIONS (%s)', v_srv, v_opts);
        ELSE
          EXECUTE format('ALTER SERVER %I OPTIONS (ADD %I %L)', v_srv, 'p' || v_rank,
                         llm_cluster_conninfo(host, port, dbname));
          v_pw := (SELECT substr(o, 10) FROM pg_user_mappings AS u, unnest(u.umoptions) AS o
                   WHERE u.srvname = v_srv AND u.usename = current_user AND o LIKE 'password=%');
          IF password IS DISTINCT FROM v_pw AND password IS NOT NULL THEN
            RAISE EXCEPTION 'pg_llm: every rank of cluster "%" is reached with one password', cluster
              USING HINT = 'PL/Proxy maps one role and password per cluster: give every rank the same password, '
                           'or leave it out and use a .pgpass file of the coordinator''s server.';
          END IF;
        END IF;
        -- postgres_fdw: a server and user mapping per rank, foreign tables on its tiles, model rows and tile md5s
        v_fdw := 'llm_rank_' || cluster || '_' || v_rank;
        EXECUTE format('DROP SERVER IF EXISTS %I CASCADE', v_fdw);
        v_opts := concat_ws(', ', CASE WHEN host IS NOT NULL THEN format('host %L', host) END,
                            CASE WHEN port IS NOT NULL THEN format('port %L', port::TEXT) END,
                            format('dbname %L', dbname),
                            'batch_size ''16''', 'fetch_size ''64''', 'parallel_commit ''true''');
        EXECUTE format('CREATE SERVER %I FOREIGN DATA WRAPPER postgres_fdw OPTIONS (%s)', v_fdw, v_opts);
        v_opts := format('user %L', v_login)
          || CASE WHEN password IS NULL THEN '' ELSE format(', password %L', password) END;
        EXECUTE format('CREATE USER MAPPING FOR CURRENT_USER SERVER %I OPTIONS (%s)', v_fdw, v_opts);
        BEGIN
          SELECT * INTO r FROM {INTERNAL}.llm_cluster_px_info(cluster, ARRAY[v_rank], NULL, NULL, FALSE);
        EXCEPTION WHEN OTHERS THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_add: rank % of cluster "%" (%) did not answer: %', v_rank, cluster,
            llm_cluster_conninfo(host, port, dbname), SQLERRM
            USING HINT = 'The rank needs a running server that accepts the role (user mapping) and pg_llm '
                         'installed in that database (psql -f install.sql, or CREATE EXTENSION pg_llm).';
        END;
        v_pre := 'llm_rank_' || cluster || '_' || v_rank;
        EXECUTE format('CREATE FOREIGN TABLE {INTERNAL}.%I (tensor_id BIGINT, tr INT, tc INT, data BYTEA) SERVER %I '
                       'OPTIONS (schema_name %L, table_name %L)', v_pre || '_tile', v_fdw, r.schema, 'llm_tile');
        EXECUTE format('CREATE FOREIGN TABLE {INTERNAL}.%I (name TEXT, step BIGINT) SERVER %I '
                       'OPTIONS (schema_name %L, table_name %L)', v_pre || '_model', v_fdw, r.schema, 'llm_model');
        EXECUTE format('CREATE FOREIGN TABLE {INTERNAL}.%I (model TEXT, name TEXT, role TEXT, shape INT[], tile INT[], '
                       'tr INT, tc INT, bytes INT, md5 TEXT) SERVER %I OPTIONS (schema_name %L, table_name %L)',
                       v_pre || '_md5', v_fdw, '{INTERNAL}', 'llm_cluster_tile_md5');
        EXECUTE format('REVOKE ALL ON {INTERNAL}.%I, {INTERNAL}.%I, {INTERNAL}.%I FROM PUBLIC', v_pre || '_tile',
                       v_pre || '_model', v_pre || '_md5');
        RETURN v_rank;
    """)
    return function("llm_cluster_add", 'cluster TEXT, host TEXT, port INT, dbname TEXT, "user" TEXT DEFAULT NULL, '
                    "password TEXT DEFAULT NULL", "INT", body,
                    note="Register a rank (a database with pg_llm) in a cluster, creating the cluster's PL/Proxy "
                    "server and the rank's postgres_fdw server, user mappings (for the current role) and foreign "
                    "tables; returns its rank number (the existing one when already registered).")


def _drop() -> str:
    body = plpgsql("r RECORD; v_n INT;", f"""
        PERFORM llm_cluster_require();
        v_n := (SELECT count(*) FROM llm_cluster_rank AS x WHERE x.cluster = llm_cluster_drop.cluster);
        IF v_n = 0 THEN
          IF if_exists THEN
            RETURN 0;
          END IF;
          PERFORM llm_cluster_ranks_of(cluster);
        END IF;
        IF NOT pg_has_role('{ADMIN_ROLE}', 'MEMBER') THEN
          RAISE EXCEPTION 'pg_llm: llm_cluster_drop: dropping a cluster is for members of {ADMIN_ROLE}'
            USING HINT = 'A superuser or a member of {ADMIN_ROLE} drops clusters.';
        END IF;
        FOR r IN SELECT x.rank FROM llm_cluster_rank AS x WHERE x.cluster = llm_cluster_drop.cluster LOOP
          EXECUTE format('DROP SERVER IF EXISTS %I CASCADE', 'llm_rank_' || cluster || '_' || r.rank);
        END LOOP;
        EXECUTE format('DROP SERVER IF EXISTS %I CASCADE', llm_cluster_server(cluster));
        DELETE FROM llm_cluster_rank AS x WHERE x.cluster = llm_cluster_drop.cluster;
        RETURN v_n;
    """)
    return function("llm_cluster_drop", "cluster TEXT, if_exists BOOLEAN DEFAULT FALSE", "INT", body,
                    note="Unregister a cluster: its ranks, PL/Proxy and postgres_fdw servers, user mappings and "
                    "foreign tables (the ranks' databases and models stay). Returns how many ranks it had.")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _helpers(), _table(), _proxies(), _add(), _drop(), inspect(),
                      sync()])
