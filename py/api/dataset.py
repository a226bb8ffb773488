"""Training data: llm_dataset holds (tokens, targets) windows of a tokenized corpus, targets shifted by one.

`pg-llm corpus load` (py/loader/corpus.py) fills it: documents joined with <|endoftext|>, the last
val_fraction of the token stream kept for validation, each part cut into windows of block_size tokens every
stride tokens. llm_dataset_source has one row per loaded source (its hash covers the texts and the cutting
parameters), so loading the same source again adds nothing."""
from __future__ import annotations

from pg_llm.gen.emit import comment, function, plpgsql, stmt
from pg_llm.gen.surface import OWNER

SQL_FILE = "api/dataset.sql"
ORDER = 75


def _tables() -> str:
    out = [stmt("""
        CREATE TABLE llm_dataset_source (
          dataset TEXT NOT NULL,
          source_hash TEXT NOT NULL,
          tokenizer TEXT NOT NULL,
          block_size INT NOT NULL CHECK (block_size > 0),
          stride INT NOT NULL CHECK (stride > 0),
          val_fraction FLOAT8 NOT NULL CHECK (val_fraction >= 0 AND val_fraction < 1),
          documents INT NOT NULL,
          tokens BIGINT NOT NULL,
          train_rows INT NOT NULL,
          val_rows INT NOT NULL,
          encoder TEXT NOT NULL,
          sources TEXT[] NOT NULL,
          loaded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          """ + OWNER + """,
          PRIMARY KEY (dataset, source_hash)
        )""", "One row per corpus load: what was read, how it was cut, how many windows it gave.")]
    out.append(stmt("""
        CREATE TABLE llm_dataset (
          id BIGSERIAL PRIMARY KEY,
          dataset TEXT NOT NULL,
          split TEXT NOT NULL CHECK (split IN ('train', 'val')),
          tokens INT[] NOT NULL,
          targets INT[] NOT NULL,
          source_hash TEXT NOT NULL,
          pos BIGINT NOT NULL,
          created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
          CHECK (cardinality(tokens) = cardinality(targets) AND cardinality(tokens) > 0),
          UNIQUE (dataset, source_hash, split, pos),
          FOREIGN KEY (dataset, source_hash) REFERENCES llm_dataset_source (dataset, source_hash) ON DELETE CASCADE
        )""", "Training windows: targets[i] is the token after tokens[i]; pos is the window's start in its "
              "split's token stream."))
    out.append(stmt("CREATE INDEX llm_dataset_split ON llm_dataset (dataset, split, id)",
                    "Batches are drawn per (dataset, split)."))
    out.append(stmt("""
        CREATE VIEW llm_datasets AS
        SELECT s.dataset, min(s.tokenizer) AS tokenizer, min(s.block_size) AS block_size,
               count(*) AS sources, sum(s.documents) AS documents, sum(s.tokens) AS tokens,
               sum(s.train_rows) AS train_rows, sum(s.val_rows) AS val_rows, max(s.loaded_at) AS loaded_at
        FROM llm_dataset_source AS s
        GROUP BY s.dataset""", "Datasets with their sizes (rows per split, tokens read)."))
    return "\n".join(out)


def _functions() -> str:
    body = plpgsql("n BIGINT; v_owner REGROLE;", """
        v_owner := (SELECT s.owner FROM llm_dataset_source AS s WHERE s.dataset = p_dataset AND NOT llm_may_own(s.owner)
                    LIMIT 1);
        IF v_owner IS NOT NULL THEN
          RAISE EXCEPTION 'pg_llm: llm_dataset_drop: dataset "%" belongs to role %', p_dataset, v_owner
            USING HINT = 'Only its owner (or a member of llm_admin) may drop it.';
        END IF;
        @drop;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
          RAISE EXCEPTION 'pg_llm: dataset "%" does not exist', p_dataset
            USING HINT = 'List datasets with: SELECT * FROM llm_datasets;';
        END IF;
        RETURN n;
    """, drop="DELETE FROM llm_dataset_source AS s WHERE s.dataset = p_dataset")
    return function("llm_dataset_drop", "p_dataset TEXT", "BIGINT", body,
                    note="Drop a dataset (its sources and windows). Returns the number of sources dropped.")


def emit() -> str:
    return "\n".join([comment(__doc__ or ""), _tables(), _functions()])
