"""llm_train_check: every argument of a training call checked before anything is written (llm_train_step, and
the loops before they claim the model), from config.TrainConfig's bounds: NULL, NaN, infinities and values out
of range get a pg_llm error naming the argument, what it must be and the recipe's default."""
from __future__ import annotations

from dataclasses import Field, fields

from pg_llm.config import TrainConfig
from pg_llm.gen.emit import comment, function, plpgsql

SQL_FILE = "api/train_check.sql"
ORDER = 85


def _check(f: Field) -> str:
    v, m = f"p_{f.name}", f.metadata
    ok = m["cond"].format(v=v, lr="p_lr")
    what = m["what"].replace("'", "''")
    if m["sql"] == "FLOAT8":
        ok = f"{v} NOT IN ('NaN'::FLOAT8, 'Infinity'::FLOAT8, '-Infinity'::FLOAT8) AND {ok}"
    bad = f"{v} IS NOT NULL AND NOT ({ok})" if m["nullable"] else f"{v} IS NULL OR NOT ({ok})"
    return f"""
        IF {bad} THEN
          RAISE EXCEPTION 'pg_llm: %: {f.name} must be {what}, got %', p_caller, coalesce({v}::TEXT, 'NULL')
            USING HINT = 'The GPT-2 recipe''s default is {f.name} => {
                'NULL' if f.default is None else repr(f.default)} (leave it out to use it).';
        END IF;"""


def emit() -> str:
    args = ", ".join(f"p_{f.name} {f.metadata['sql']}" for f in fields(TrainConfig))
    body = plpgsql("v_rows BIGINT;", """
        IF p_dataset IS NULL THEN
          RAISE EXCEPTION 'pg_llm: %: dataset must be named', p_caller USING
            HINT = 'Pass dataset => NAME (SELECT dataset FROM llm_datasets lists them).';
        END IF;
        IF p_split IS NULL THEN
          RAISE EXCEPTION 'pg_llm: %: split must be named', p_caller USING
            HINT = 'The default is split => ''train''.';
        END IF;
        v_rows := (SELECT count(*) FROM llm_dataset AS d WHERE d.dataset = p_dataset AND d.split = p_split);
        IF v_rows = 0 THEN
          RAISE EXCEPTION 'pg_llm: %: dataset "%" has no rows in split "%"', p_caller, p_dataset, p_split
            USING
              HINT = 'Load a corpus with: pg-llm corpus load --name ' || p_dataset || ' FILES... (SELECT * FROM '
                'llm_datasets lists what is loaded).';
        END IF;
        IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > v_rows THEN
          RAISE EXCEPTION 'pg_llm: %: batch_size must be between 1 and the % rows of split "%" of dataset "%", got %',
            p_caller, v_rows, p_split, p_dataset, coalesce(p_batch_size::TEXT, 'NULL')
            USING HINT = 'A step draws batch_size distinct rows (default 8); '
              'gradient accumulation (grad_accum => N) makes bigger batches from several draws.';
        END IF;""" + "".join(_check(f) for f in fields(TrainConfig)))
    check = function("llm_train_check", f"p_caller TEXT, p_dataset TEXT, p_split TEXT, p_batch_size INT, {args}",
                     "VOID", body, volatility="STABLE",
                     note="Refuse a training call's bad arguments (NULL, NaN, out of range) before it writes.")
    return "\n".join([comment(__doc__ or ""), check])
