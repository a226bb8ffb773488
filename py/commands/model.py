"""pg-llm model import|export|list|drop: GPT-2 weights in and out of pg_llm (files are read and written on
the client; tensors travel by binary COPY).

  pg-llm model import --name gpt2 ~/models/gpt2          # Hugging Face dir: config.json + model.safetensors
  pg-llm model import --name mine weights.npz --config my-config   # .npz: same names; config by name
  pg-llm model export --name gpt2 out/gpt2               # GPT2LMHeadModel.from_pretrained('out/gpt2') loads it
  pg-llm model export --name gpt2 --checkpoint 3 out/c3  # the parameters of in-database checkpoint 3
"""
from __future__ import annotations

import argparse

import psycopg

from pg_llm.commands.db import dsn_argument, resolve_dsn
from pg_llm.loader.model import export_model, import_model


def _import(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        r = import_model(conn, args.path, args.name, config=args.config, replace=args.replace, note=args.note,
                         progress=not args.quiet)
    print(f"imported model {r.model!r} (config {r.config}): {r.tensors} tensors, {r.params:,} parameters, "
          f"{r.bytes / 2**20:.1f} MiB in {r.seconds:.1f} s")
    return 0


def _export(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        r = export_model(conn, args.name, args.out_dir, force=args.force, progress=not args.quiet,
                         checkpoint=args.checkpoint)
    src = f" (checkpoint {args.checkpoint})" if args.checkpoint is not None else ""
    tok = f", tokenizer {r.tokenizer!r}" if r.tokenizer else " (no tokenizer files: its tokenizer is not imported)"
    print(f"exported model {r.model!r}{src} to {r.out_dir}: {r.tensors} tensors, {r.bytes / 2**20:.1f} MiB{tok} "
          f"in {r.seconds:.1f} s")
    return 0


def _list(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        rows = conn.execute("SELECT name, config, step, tensors, params FROM llm_models ORDER BY name").fetchall()
    if not rows:
        print("no models (pg-llm model import --name NAME PATH)")
    for name, config, step, tensors, params in rows:
        print(f"{name}\tconfig={config}\tstep={step}\ttensors={tensors}\tparams={params:,}")
    return 0


def _drop(args: argparse.Namespace) -> int:
    with psycopg.connect(resolve_dsn(args.dsn)) as conn:
        n = conn.execute("SELECT llm_model_drop(%s)", (args.name,)).fetchone()[0]
    print(f"dropped model {args.name!r} and {n} tensors")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="import/export GPT-2 weights (Hugging Face or .npz), list/drop models",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    s = msub.add_parser("import", help="import a Hugging Face GPT-2 directory or .npz as a model (one transaction)",
                        description="Import GPT-2 weights: a Hugging Face directory (config.json + model.safetensors "
                        "or pytorch_model.bin), a .safetensors file, or an .npz with the same tensor names. Names, "
                        "shapes and finiteness are checked before anything is written; all tensors or none.")
    s.add_argument("--name", "--model", dest="name", required=True, help="model name (llm_model.name)")
    s.add_argument("path", metavar="PATH", help="Hugging Face directory, .safetensors, .bin or .npz (client side)")
    s.add_argument("--config", default=None, help="llm_model_config row to use (needed for an .npz whose sizes "
                   "match no standard config; default: from config.json)")
    s.add_argument("--replace", action="store_true", help="replace an existing model of that name (its params, "
                   "grads and Adam state are dropped)")
    s.add_argument("--note", default=None, help="free text stored in llm_model.note")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dsn_argument(s)
    s.set_defaults(func=_import)

    e = msub.add_parser("export", help="write a model as a Hugging Face directory (config.json + model.safetensors)",
                        description="Export a model to OUT_DIR as config.json + model.safetensors (float32) that "
                        "transformers' GPT2LMHeadModel.from_pretrained loads.")
    e.add_argument("--name", "--model", dest="name", required=True, help="model name")
    e.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created; client side)")
    e.add_argument("--checkpoint", type=int, default=None, metavar="ID", help="export this in-database checkpoint "
                   "of the model (llm_checkpoints) instead of its current parameters")
    e.add_argument("--force", action="store_true", help="overwrite config.json / model.safetensors in OUT_DIR")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dsn_argument(e)
    e.set_defaults(func=_export)

    ls = msub.add_parser("list", help="list models with their config, step and parameter count")
    dsn_argument(ls)
    ls.set_defaults(func=_list)

    d = msub.add_parser("drop", help="drop a model and all its tensors")
    d.add_argument("--name", "--model", dest="name", required=True, help="model name")
    dsn_argument(d)
    d.set_defaults(func=_drop)
