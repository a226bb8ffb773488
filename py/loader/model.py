"""Import a GPT-2 checkpoint into pg_llm and export a model back to a Hugging Face directory (client side).

import_model runs in ONE transaction: the checkpoint is opened (headers only), the config resolved, every
tensor's name and shape checked against it and every value checked finite, and only then are the model row
and the tensors written (binary COPY through pg_llm.loader.tensors). Any error leaves the database as it was.

Which config a model gets:
  * --config NAME: that llm_model_config row (config.json, if present, must agree on the architecture);
  * else config.json: the standard row (gpt2-small, ...) whose every column matches it, otherwise a config
    named after the model (created, reused when equal, or updated when only this model uses it);
  * else (.npz without config.json): the standard row matching the tensor shapes, or an error asking for
    --config (n_head cannot be read off the shapes).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import psycopg
from psycopg.rows import dict_row
from tqdm import tqdm

from pg_llm.config import STANDARD, GPT2Config
from pg_llm.kernels.npz import infer_standard, shape_problems
from pg_llm.loader.checkpoint import Checkpoint, CheckpointError, Entry, open_checkpoint, safetensors_header
from pg_llm.loader.tensors import read_tensor, write_tensor
from pg_llm.loader.tokenizer_export import write_hf_tokenizer

ARCH = ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size", "tied_embeddings", "layer_norm_epsilon",
        "activation")


@dataclass(frozen=True)
class ImportResult:
    model: str
    config: str
    tensors: int
    params: int
    bytes: int
    seconds: float
    state_tensors: int = 0  # adam_m/adam_v tensors (import_model(with_state=True))
    step: int = 0


@dataclass(frozen=True)
class ExportResult:
    model: str
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    tokenizer: str | None = None  # the database tokenizer written beside the weights (None: it has none)


def _arch(c: GPT2Config) -> tuple:
    return tuple(getattr(c, f) for f in ARCH)


def _describe(c: GPT2Config) -> str:
    return ", ".join(f"{f}={getattr(c, f)}" for f in ARCH)


def _configs(conn: psycopg.Connection) -> dict[str, GPT2Config]:
    with conn.cursor(row_factory=dict_row) as cur:
        return {r["name"]: GPT2Config.from_row(r) for r in cur.execute("SELECT * FROM llm_model_config")}


def _infer(ckpt: Checkpoint, rows: dict[str, GPT2Config]) -> str:
    """The standard config whose sizes match a checkpoint without config.json (rule shared with the server's
    pg_llm_import_npz: pg_llm.kernels.npz.infer_standard)."""
    std = [(n, c.n_layer, c.n_embd, c.n_ctx, c.vocab_size) for n in STANDARD if (c := rows.get(n))]
    name, sizes = infer_standard({n: e.shape for n, e in ckpt.tensors.items()}, std)
    if name is not None:
        return name
    if "wte.weight" not in ckpt.tensors or "wpe.weight" not in ckpt.tensors:
        raise CheckpointError(f"{ckpt.path}: {sizes}; pass --config NAME")
    raise CheckpointError(f"{ckpt.path} has no config.json and its sizes ({sizes}) match no standard config: pass "
                          "--config NAME (add one with INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, "
                          "n_ctx, vocab_size) VALUES (...))")


def resolve_config(conn: psycopg.Connection, ckpt: Checkpoint, model: str,
                   config: str | None) -> tuple[str, GPT2Config, str | None]:
    """(config name, config, action) where action is None, 'insert' or 'update' (of the row named `model`)."""
    rows = _configs(conn)
    if config is not None:
        if config not in rows:
            raise CheckpointError(f"unknown model config {config!r}; known configs: {', '.join(sorted(rows))}")
        c = rows[config]
        if ckpt.config is not None and _arch(ckpt.config) != _arch(c):
            raise CheckpointError(f"config.json of {ckpt.path} ({_describe(ckpt.config)}) does not match config "
                                  f"{config!r} ({_describe(c)})")
        return config, c, None
    if ckpt.config is None:
        name = _infer(ckpt, rows)
        return name, rows[name], None
    named = ckpt.config_name  # a pg_llm checkpoint file names its config: reuse or create that row
    if named and rows.get(named) == ckpt.config:
        return named, rows[named], None
    for name in STANDARD:
        if rows.get(name) == ckpt.config:
            return name, rows[name], None
    if named and named not in rows and named not in STANDARD:
        return named, ckpt.config, "insert"
    if model in STANDARD:
        raise CheckpointError(f"config.json of {ckpt.path} ({_describe(ckpt.config)}) differs from the standard "
                              f"config {model!r}, which a model of that name would overwrite: pick another model "
                              "name or pass --config NAME")
    if model not in rows:
        return model, ckpt.config, "insert"
    if rows[model] == ckpt.config:
        return model, rows[model], None
    users = [r[0] for r in conn.execute("SELECT name FROM llm_model WHERE config = %s AND name <> %s ORDER BY name",
                                        (model, model))]
    if users:
        raise CheckpointError(f"config {model!r} already exists with different values ({_describe(rows[model])}) "
                              f"and is used by models {', '.join(users)}; pass --config NAME")
    return model, ckpt.config, "update"


def plan(ckpt: Checkpoint, cfg: GPT2Config) -> tuple[dict[str, Entry], Entry | None]:
    """Check names and shapes against the config (no data read). Returns the tensors to store, in canonical
    order, and a tied lm_head.weight to compare with wte.weight (or None)."""
    expected = cfg.param_shapes()
    tensors = dict(ckpt.tensors)
    head = tensors.pop("lm_head.weight", None) if cfg.tied_embeddings else None
    problems = shape_problems(expected, {n: e.shape for n, e in ckpt.tensors.items()}, cfg.tied_embeddings)
    if problems:
        raise CheckpointError(f"{ckpt.path} does not match the GPT-2 config ({_describe(cfg)}): "
                              + " | ".join(problems) + "; nothing was written")
    return {n: tensors[n] for n in expected}, head


def check_values(entries: dict[str, Entry], head: Entry | None, progress: bool = False) -> None:
    """Every value finite, and a tied lm_head equal to wte. Reads every tensor once."""
    total = sum(4 * int(np.prod(e.shape)) for e in entries.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="check", disable=not progress) as bar:
        for name, e in entries.items():
            a = e.float32()
            if not np.isfinite(a).all():
                bad = int((~np.isfinite(a)).sum())
                raise CheckpointError(f"{e.source}: tensor {name!r} has {bad} NaN/Inf value(s) (after conversion "
                                      f"from {e.dtype} to float32); nothing was written")
            bar.update(a.nbytes)
    if head is not None and not np.array_equal(head.float32(), entries["wte.weight"].float32()):
        raise CheckpointError(f"{head.source}: lm_head.weight differs from wte.weight but the config ties them "
                              "(tie_word_embeddings); nothing was written")


def plan_state(ckpt: Checkpoint, cfg: GPT2Config) -> tuple[dict[tuple[str, str], Entry], int]:
    """Optimizer state of a pg_llm checkpoint file checked against the config (no data read): the moments
    (any subset of the parameters, same shapes) and the step."""
    expected = cfg.param_shapes()
    problems = [f"{r}/{n} is not a parameter of the config" for r, n in ckpt.state if n not in expected]
    problems += [f"{r}/{n} has shape {e.shape}, expected {expected[n]}" for (r, n), e in ckpt.state.items()
                 if n in expected and e.shape != expected[n]]
    step = ckpt.meta.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problems.append(f"step {step!r} is not a non-negative integer")
    if problems:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not match the GPT-2 config ({_describe(cfg)}): "
                              + "; ".join(problems[:8]) + "; nothing was written")
    order = {n: i for i, n in enumerate(expected)}
    return dict(sorted(ckpt.state.items(), key=lambda kv: (kv[0][0], order[kv[0][1]]))), step


def import_model(conn: psycopg.Connection, path: str | os.PathLike, name: str, *, config: str | None = None,
                 replace: bool = False, note: str | None = None, tile: tuple[int, int] | None = None,
                 progress: bool = False, with_state: bool = False) -> ImportResult:
    """Import a checkpoint as model `name` (all tensors or none). See the module docstring for the config.
    with_state also restores what a pg_llm checkpoint file holds beyond the weights: the AdamW moments
    (role adam_m/adam_v) and llm_model.step (pg_llm.loader.state writes such files)."""
    t0 = time.monotonic()
    if not name:
        raise ValueError("a model needs a non-empty name")
    ckpt = open_checkpoint(path)
    with conn.transaction():
        exists = conn.execute("SELECT 1 FROM llm_model WHERE name = %s", (name,)).fetchone() is not None
        stray = conn.execute("SELECT count(*) FROM llm_tensor WHERE model = %s AND id > 0", (name,)).fetchone()[0]
        if (exists or stray) and not replace:
            what = "already exists" if exists else f"has {stray} tensors but no llm_model row"
            raise ValueError(f"model {name!r} {what}; pass --replace (replace=True) to overwrite it")
        cfg_name, cfg, action = resolve_config(conn, ckpt, name, config)
        entries, head = plan(ckpt, cfg)
        state, step = plan_state(ckpt, cfg) if with_state else ({}, 0)
        check_values({**entries, **{f"{r}/{n}": e for (r, n), e in state.items()}}, head, progress)
        # ---- nothing was written above this line ----
        if exists or stray:
            conn.execute("SELECT llm_model_drop(%s, TRUE)", (name,))
        if action is not None:
            _write_config(conn, cfg_name, cfg, action, f"imported from {ckpt.path}")
        conn.execute("SELECT llm_model_create(%s, %s, %s)", (name, cfg_name, note))
        todo = [(("param", n), e) for n, e in entries.items()] + list(state.items())
        total = sum(4 * int(np.prod(e.shape)) for _, e in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"import {name}", disable=not progress) as bar:
            for (role, tname), e in todo:
                a = e.float32()
                write_tensor(conn, a, tname, model=name, role=role, tile=tile, check_nan=False)
                bar.update(a.nbytes)
        if step:
            conn.execute("UPDATE llm_model SET step = %s WHERE name = %s", (step, name))
        conn.execute("SELECT llm_internal.llm_model_check(%s)", (name,))  # the SQL side agrees with pg_llm.config
    return ImportResult(name, cfg_name, len(entries), cfg.n_params(), total, time.monotonic() - t0, len(state), step)


def _write_config(conn: psycopg.Connection, name: str, cfg: GPT2Config, action: str, note: str) -> None:
    cols = [f.name for f in fields(GPT2Config)]
    vals = [getattr(cfg, c) for c in cols]
    if action == "insert":
        conn.execute(f"INSERT INTO llm_model_config (name, {', '.join(cols)}, note) "
                     f"VALUES (%s, {', '.join(['%s'] * len(cols))}, %s)", [name, *vals, note])
    else:
        conn.execute(f"UPDATE llm_model_config SET {', '.join(c + ' = %s' for c in cols)}, note = %s "
                     "WHERE name = %s", [*vals, note, name])


def hf_name(name: str) -> str:
    """The key GPT2LMHeadModel.save_pretrained uses for a pg_llm parameter name."""
    return name if name.startswith("lm_head.") else "transformer." + name


def resolve_source(conn: psycopg.Connection, name: str, checkpoint: int | None = None) -> tuple[str, str, GPT2Config,
                                                                                              int]:
    """Where the tensors of model `name` (or of its in-database checkpoint) are: (llm_tensor.model owning
    them, config name, config, step). Errors for an unknown model/checkpoint or one of another model."""
    with conn.cursor(row_factory=dict_row) as cur:
        if checkpoint is None:
            row = cur.execute("SELECT c.*, m.step FROM llm_internal.llm_model_check(%s) AS c "
                              "JOIN llm_model AS m ON m.name = %s", (name, name)).fetchone()
            return name, row["name"], GPT2Config.from_row(row), int(row["step"])
        ck = cur.execute("SELECT * FROM llm_internal.llm_checkpoint_get(%s, %s)", (checkpoint, name)).fetchone()
        row = cur.execute("SELECT * FROM llm_internal.llm_model_config_get(%s)", (ck["config"],)).fetchone()
        return ck["store"], ck["config"], GPT2Config.from_row(row), int(ck["step"])


def tensor_ids(conn: psycopg.Connection, owner: str, cfg: GPT2Config, roles: tuple[str, ...] = ("param",),
               what: str = "") -> dict[tuple[str, str], int]:
    """(role, name) -> id of the durable tensors of `owner`, checked: every parameter of the config with its
    shape, moments only of parameters and shaped like them."""
    shapes = cfg.param_shapes()
    rows = conn.execute("SELECT role, name, id, shape FROM llm_tensor WHERE model = %s AND role = ANY(%s) AND id > 0",
                        (owner, list(roles))).fetchall()
    found = {(r, n): (i, tuple(s)) for r, n, i, s in rows}
    bad = [n for n in shapes if ("param", n) not in found]
    bad += [f"{r}/{n} {s}" for (r, n), (_, s) in found.items() if shapes.get(n) != s]
    if bad:
        raise ValueError(f"{what or owner} does not hold the parameters of its config: {', '.join(bad[:8])}")
    order = {n: i for i, n in enumerate(shapes)}
    return {k: v[0] for k, v in sorted(found.items(), key=lambda kv: (roles.index(kv[0][0]), order[kv[0][1]]))}


def export_model(conn: psycopg.Connection, name: str, out_dir: str | os.PathLike, *, force: bool = False,
                 progress: bool = False, checkpoint: int | None = None) -> ExportResult:
    """Write model `name` (or its in-database checkpoint `checkpoint`, see llm_checkpoint_save) as a Hugging
    Face directory: config.json + model.safetensors (float32), and the config's tokenizer as GPT-2 tokenizer
    files when the database has it (AutoTokenizer.from_pretrained then encodes as llm_encode)."""
    t0 = time.monotonic()
    out = Path(out_dir).expanduser()
    weights, config_path = out / "model.safetensors", out / "config.json"
    if not force and (weights.exists() or config_path.exists()):
        raise FileExistsError(f"{out} already holds a model (config.json / model.safetensors); pass --force")
    top = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if top:  # one consistent snapshot even while a training run updates the model
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        owner, cfg_name, cfg, _ = resolve_source(conn, name, checkpoint)
        tok = conn.execute("SELECT c.tokenizer FROM llm_model_config AS c JOIN llm_tokenizer AS t "
                           "ON t.name = c.tokenizer WHERE c.name = %s", (cfg_name,)).fetchone()
        what = f"checkpoint {checkpoint} of model {name!r}" if checkpoint is not None else f"model {name!r}"
        ids = tensor_ids(conn, owner, cfg, what=what)
        shapes = cfg.param_shapes()
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".model.safetensors.partial"
        total = 0
        try:
            with open(tmp, "wb") as f, tqdm(total=4 * cfg.n_params(), unit="B", unit_scale=True,
                                             desc=f"export {name}", disable=not progress) as bar:
                f.write(safetensors_header({hf_name(n): s for n, s in shapes.items()}))
                for n in shapes:
                    data = np.ascontiguousarray(read_tensor(conn, ids[("param", n)]), dtype="<f4").tobytes()
                    f.write(data)
                    total += len(data)
                    bar.update(len(data))
            os.replace(tmp, weights)
        finally:
            tmp.unlink(missing_ok=True)
        if tok:
            write_hf_tokenizer(conn, tok[0], out, cfg.n_ctx)
    config_path.write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    return ExportResult(name, out, len(shapes), total, time.monotonic() - t0, tok[0] if tok else None)
