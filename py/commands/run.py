"""pg-llm train | generate | eval: the SQL API from a shell, nothing more. Each is one statement
(CALL llm_train_run, llm_generate_stream, llm_perplexity / llm_eval_loss); the server's NOTICEs drive a progress
bar or the streamed text. Arguments left out are the SQL defaults (or, for train, the run's own schedule).

  pg-llm train bard --steps 100 --dataset shakespeare --batch-size 8
  pg-llm generate bard "To be, or not" --max-new-tokens 40 --temperature 0.8 --top-k 40 --seed 7
  pg-llm eval bard --text "To be, or not to be"        # or --dataset shakespeare [--split val]
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import psycopg
from psycopg import sql

from pg_llm.commands.db import dsn_argument, resolve_dsn

TRAIN_ARGS = {"dataset": str, "batch_size": int, "lr": float, "warmup_steps": int, "max_steps": int,
              "min_lr": float, "weight_decay": float, "grad_clip": float, "dropout": float, "grad_accum": int,
              "seed": int, "eval_every": int, "eval_rows": int}
GENERATE_ARGS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}
STEP = re.compile(r"^step (\d+)/(\d+) \| loss (\S+)")
TOKEN = re.compile(r"^pg_llm: step \d+: token \d+ (.*)$", re.S)


def _named(values: dict[str, object]) -> tuple[sql.Composable, list[object]]:
    """`, name => %s, ...` for the arguments given (None: left to the SQL default)."""
    given = {k: v for k, v in values.items() if v is not None}
    parts = [sql.SQL(", {} => %s").format(sql.Identifier(k)) for k in given]
    return sql.SQL("").join(parts), list(given.values())


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    named, params = _named({k: getattr(args, k) for k in TRAIN_ARGS})
    bar = tqdm(total=args.steps, unit="step", disable=args.quiet, dynamic_ncols=True)

    def on_notice(d: psycopg.errors.Diagnostic) -> None:
        msg = d.message_primary or ""
        if m := STEP.match(msg):
            bar.total = int(m.group(2))
            bar.n = int(m.group(1))
            bar.set_postfix_str(f"loss {m.group(3)}")
            bar.refresh()
        if args.quiet or not m:
            print(msg, file=sys.stderr)

    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        conn.add_notice_handler(on_notice)
        conn.execute(sql.SQL("CALL llm_train_run(%s, %s{})").format(named), [args.model, args.steps, *params])
        bar.close()
        row = conn.execute("SELECT step, loss, val_loss FROM llm_train_log WHERE model = %s ORDER BY step DESC "
                           "LIMIT 1", (args.model,)).fetchone()
    if row:
        print(f"step {row[0]} | loss {row[1]:.4f}" + (f" | val_loss {row[2]:.4f}" if row[2] is not None else ""))
    return 0


def _generate(args: argparse.Namespace) -> int:
    named, params = _named({k: getattr(args, k) for k in GENERATE_ARGS})

    def on_notice(d: psycopg.errors.Diagnostic) -> None:
        if m := TOKEN.match(d.message_primary or ""):
            sys.stdout.write(json.loads(m.group(1)))
            sys.stdout.flush()
        else:
            print(d.message_primary, file=sys.stderr)

    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        conn.add_notice_handler(on_notice)
        sys.stdout.write(args.prompt)
        conn.execute(sql.SQL("SELECT count(*) FROM llm_generate_stream(%s, %s{})").format(named),
                     [args.model, args.prompt, *params])
    sys.stdout.write("\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.dataset is None):
        raise ValueError("give --text TEXT or --dataset NAME (one of them)")
    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        if args.text is not None:
            row = conn.execute("SELECT perplexity, tokens_scored, mean_loss FROM llm_perplexity(%s, %s)",
                               (args.model, args.text)).fetchone()
        else:
            row = conn.execute("SELECT perplexity, tokens_scored, mean_loss FROM llm_perplexity(%s, "
                               "dataset => %s, split => %s)", (args.model, args.dataset, args.split)).fetchone()
    assert row is not None
    print(f"perplexity {row[0]:.4f} | mean loss {row[2]:.4f} | {row[1]} tokens scored")
    return 0


def _options(p: argparse.ArgumentParser, spec: dict[str, type]) -> None:
    for name, kind in spec.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                       help=f"{name} => ... (default: the SQL function's)")


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="CALL llm_train_run with a progress bar", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("model")
    t.add_argument("--steps", type=int, required=True, help="train up to this many steps in total")
    _options(t, TRAIN_ARGS)
    t.add_argument("--quiet", action="store_true", help="no progress bar: the server's NOTICE lines instead")
    dsn_argument(t)
    t.set_defaults(func=_train)
    g = sub.add_parser("generate", help="stream llm_generate_stream's text", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model")
    g.add_argument("prompt")
    _options(g, GENERATE_ARGS)
    dsn_argument(g)
    g.set_defaults(func=_generate)
    e = sub.add_parser("eval", help="perplexity of a text or a dataset split (llm_perplexity)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model")
    e.add_argument("--text", help="score this text")
    e.add_argument("--dataset", help="score this dataset's split")
    e.add_argument("--split", default="val", help="with --dataset (default: val)")
    dsn_argument(e)
    e.set_defaults(func=_eval)
