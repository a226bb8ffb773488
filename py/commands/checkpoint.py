"""pg-llm checkpoint save|load|list|drop|export|import: training state in and out of pg_llm.

In the database (SQL: llm_checkpoint_save / llm_checkpoint_load / llm_checkpoints / llm_checkpoint_drop):
  pg-llm checkpoint save --model gpt2 --note "before lr bump"     # prints the checkpoint id
  pg-llm checkpoint load --model gpt2 --id 3                      # params, Adam moments and step restored
Through local files (read/written on this machine, tensors by binary COPY; no server file access):
  pg-llm checkpoint export --model gpt2 gpt2-state.npz            # the model now (or --id 3: a checkpoint)
  pg-llm checkpoint export --model gpt2 --id 3 out/gpt2-step900   # a directory: HF model + optimizer state
  pg-llm checkpoint import --model gpt2b gpt2-state.npz           # a new model with that state
"""
from __future__ import annotations

import argparse

import psycopg

from pg_llm.commands.db import dsn_argument, resolve_dsn


def _save(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        cid = conn.execute("SELECT llm_checkpoint_save(model => %s, note => %s)", (args.model, args.note)).fetchone()[0]
        step = conn.execute("SELECT step FROM llm_checkpoint WHERE id = %s", (cid,)).fetchone()[0]
    print(f"saved checkpoint {cid} of model {args.model!r} at step {step}")
    return 0


def _load(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        step = conn.execute("SELECT step FROM llm_checkpoint_load(model => %s, id => %s)",
                            (args.model, args.id)).fetchone()[0]
    print(f"model {args.model!r} restored from checkpoint {args.id} (step {step})")
    return 0


def _list(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        rows = conn.execute("SELECT id, model, step, moments, bytes, model_exists, created_at, note "
                            "FROM llm_checkpoints WHERE %s::TEXT IS NULL OR model = %s ORDER BY id",
                            (args.model, args.model)).fetchall()
    if not rows:
        print("no checkpoints (pg-llm checkpoint save --model NAME)")
    for cid, model, step, moments, size, exists, created, note in rows:
        print(f"{cid}\tmodel={model}{'' if exists else ' (dropped)'}\tstep={step}\t"
              f"moments={','.join(moments) or '-'}\t{size / 2**20:.1f} MiB\t{created:%Y-%m-%d %H:%M}\t{note or ''}")
    return 0


def _drop(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        n = conn.execute("SELECT llm_checkpoint_drop(id => %s)", (args.id,)).fetchone()[0]
    print(f"dropped checkpoint {args.id} ({n} tensors)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pg_llm.loader.state import export_state

    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        r = export_state(conn, args.model, args.out, checkpoint=args.id, force=args.force, compress=args.compress,
                         progress=not args.quiet)
    src = f"checkpoint {args.id} of model {r.model!r}" if args.id is not None else f"model {r.model!r}"
    print(f"exported {src} (step {r.step}) to {r.path}: {r.tensors} parameter tensors, {r.moments} Adam moment "
          f"tensors, {r.bytes / 2**20:.1f} MiB in {r.seconds:.1f} s")
    return 0


def _import(args: argparse.Namespace) -> int:
    from pg_llm.loader.state import import_state

    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        r = import_state(conn, args.path, args.model, config=args.config, replace=args.replace, note=args.note,
                         progress=not args.quiet)
    print(f"imported model {r.model!r} (config {r.config}) at step {r.step}: {r.tensors} parameter tensors, "
          f"{r.state_tensors} Adam moment tensors, {r.params:,} parameters in {r.seconds:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="save/load/list/drop in-database checkpoints; export/import training "
                       "state (params + Adam moments + step) through local files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)

    s = csub.add_parser("save", help="snapshot a model's params, Adam moments and step inside the database")
    s.add_argument("--model", "--name", dest="model", required=True, help="model name")
    s.add_argument("--note", default=None, help="free text stored with the checkpoint")
    dsn_argument(s)
    s.set_defaults(func=_save)

    ld = csub.add_parser("load", help="restore a model from one of its checkpoints (bit-exact, step included)")
    ld.add_argument("--model", "--name", dest="model", required=True,
                    help="model name (the checkpoint must be of this model)")
    ld.add_argument("--id", required=True, type=int, help="checkpoint id (pg-llm checkpoint list)")
    dsn_argument(ld)
    ld.set_defaults(func=_load)

    ls = csub.add_parser("list", help="list checkpoints")
    ls.add_argument("--model", default=None, help="only this model's")
    dsn_argument(ls)
    ls.set_defaults(func=_list)

    d = csub.add_parser("drop", help="drop a checkpoint and its snapshot tensors")
    d.add_argument("--id", required=True, type=int, help="checkpoint id")
    dsn_argument(d)
    d.set_defaults(func=_drop)

    e = csub.add_parser("export", help="write params + Adam moments + step + config to OUT.npz or OUT_DIR",
                        description="Write a model's training state (or, with --id, one of its in-database "
                        "checkpoints) to a local file: OUT.npz (params by pg_llm name, adam_m/NAME, adam_v/NAME, "
                        "metadata __pg_llm__) or OUT_DIR (config.json + model.safetensors as Hugging Face, plus "
                        "optimizer.safetensors and pg_llm.json). Bit-exact float32; one consistent snapshot.")
    e.add_argument("--model", "--name", dest="model", required=True, help="model name")
    e.add_argument("--id", type=int, default=None, help="export this in-database checkpoint of the model "
                   "(default: the model's current state)")
    e.add_argument("out", metavar="OUT.npz|OUT_DIR", help="output .npz file or directory (client side)")
    e.add_argument("--compress", action="store_true", help="deflate the .npz members (np.savez_compressed)")
    e.add_argument("--force", action="store_true", help="overwrite an existing output")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dsn_argument(e)
    e.set_defaults(func=_export)

    i = csub.add_parser("import", help="create a model from a checkpoint file: params + Adam moments + step",
                        description="Create model --model from a file written by pg-llm checkpoint export (params, "
                        "Adam moments, step, config), or from any checkpoint pg-llm model import reads (then at "
                        "step 0 without moments). Everything is checked before anything is written; one "
                        "transaction.")
    i.add_argument("--model", required=True, help="name of the model to create")
    i.add_argument("path", metavar="PATH", help=".npz file or directory (client side)")
    i.add_argument("--config", default=None, help="llm_model_config row to use (default: the file's config)")
    i.add_argument("--replace", action="store_true", help="replace an existing model of that name")
    i.add_argument("--note", default=None, help="free text stored in llm_model.note")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dsn_argument(i)
    i.set_defaults(func=_import)
