"""pg-llm checkpoint export/import: a model's whole training state (parameters, AdamW moments, optimizer step,
config) through local files, on the client (binary COPY; the server never touches the file).

Two layouts, chosen by the path:
  OUT.npz   parameters under pg_llm names (wte.weight, h.0.attn.c_attn.weight, ...), moments as
            "adam_m/<name>" and "adam_v/<name>", and the metadata member "__pg_llm__" (JSON: format, model,
            config_name, config, step, checkpoint, note). np.load reads it; `pg-llm model import` and
            pg_llm_import_npz take its parameters.
  OUT_DIR/  a Hugging Face directory (config.json + model.safetensors, which transformers loads) plus
            optimizer.safetensors (adam_m/<name>, adam_v/<name>) and pg_llm.json (the metadata).
Values are float32 bit for bit. Import is pg_llm.loader.model.import_model(with_state=True): one transaction,
everything checked first (names, shapes, NaN/Inf, moments of parameters), then params, moments and step.
"""
from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from tqdm import tqdm

from pg_llm.kernels.npz import META_KEY, meta_array, npz_write
from pg_llm.loader.checkpoint import safetensors_header
from pg_llm.loader.model import ImportResult, hf_name, import_model, resolve_source, tensor_ids
from pg_llm.loader.tensors import read_tensor

FORMAT = "pg_llm.checkpoint"
ROLES = ("param", "adam_m", "adam_v")
DIR_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "pg_llm.json")


@dataclass(frozen=True)
class StateExport:
    model: str
    path: Path
    tensors: int  # parameters
    moments: int  # adam_m + adam_v tensors
    step: int
    bytes: int
    seconds: float


def _key(role: str, name: str) -> str:
    return name if role == "param" else f"{role}/{name}"


def _atomic(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _write_safetensors(conn: psycopg.Connection, path: Path, items: list[tuple[str, tuple[int, ...], int]],
                       bar: tqdm) -> int:
    """items: (key, shape, tensor id), written in order."""
    tmp, total = _atomic(path), 0
    try:
        with open(tmp, "wb") as f:
            f.write(safetensors_header({k: s for k, s, _ in items}))
            for _, _, tid in items:
                data = np.ascontiguousarray(read_tensor(conn, tid), dtype="<f4").tobytes()
                f.write(data)
                total += len(data)
                bar.update(len(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return total


def _write_npz(conn: psycopg.Connection, path: Path, ids: dict[tuple[str, str], int], meta: dict[str, Any],
               compress: bool, bar: tqdm) -> int:
    tmp, total = _atomic(path), 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
                             allowZip64=True) as zf:
            for (role, name), tid in ids.items():
                a = read_tensor(conn, tid)
                npz_write(zf, _key(role, name), a)
                total += a.nbytes
                bar.update(a.nbytes)
            npz_write(zf, META_KEY, meta_array(meta))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return total


def export_state(conn: psycopg.Connection, model: str, out: str | os.PathLike, *, checkpoint: int | None = None,
                 force: bool = False, compress: bool = False, progress: bool = False) -> StateExport:
    """Write model `model` (or its in-database checkpoint `checkpoint`) with moments and step to OUT.npz or
    OUT_DIR (see the module docstring), from one consistent snapshot."""
    t0 = time.monotonic()
    out = Path(out).expanduser()
    is_npz = out.suffix == ".npz"
    if not force and (out.exists() if is_npz else any((out / f).exists() for f in DIR_FILES)):
        raise FileExistsError(f"{out} already {'exists' if is_npz else 'holds a checkpoint'}; pass --force")
    top = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if top:  # one snapshot of params, moments and step even while a training run goes on
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        owner, cfg_name, cfg, step = resolve_source(conn, model, checkpoint)
        what = f"checkpoint {checkpoint} of model {model!r}" if checkpoint is not None else f"model {model!r}"
        ids = tensor_ids(conn, owner, cfg, ROLES, what)
        note = None
        if checkpoint is not None:
            note = conn.execute("SELECT note FROM llm_checkpoint WHERE id = %s", (checkpoint,)).fetchone()[0]
        meta = {"format": FORMAT, "version": 1, "model": model, "config_name": cfg_name, "config": cfg.as_dict(),
                "step": step, "checkpoint": checkpoint, "note": note,
                "moments": sorted({r for r, _ in ids if r != "param"})}
        shapes = cfg.param_shapes()
        n_bytes = sum(4 * int(np.prod(shapes[n])) for _, n in ids)
        with tqdm(total=n_bytes, unit="B", unit_scale=True, desc=f"export {what}", disable=not progress) as bar:
            if is_npz:
                out.parent.mkdir(parents=True, exist_ok=True)
                total = _write_npz(conn, out, ids, meta, compress, bar)
            else:
                out.mkdir(parents=True, exist_ok=True)
                params = [(hf_name(n), shapes[n], i) for (r, n), i in ids.items() if r == "param"]
                moments = [(_key(r, n), shapes[n], i) for (r, n), i in ids.items() if r != "param"]
                total = _write_safetensors(conn, out / "model.safetensors", params, bar)
                if moments:
                    total += _write_safetensors(conn, out / "optimizer.safetensors", moments, bar)
                else:
                    (out / "optimizer.safetensors").unlink(missing_ok=True)
                (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
                (out / "pg_llm.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    n_moments = sum(1 for r, _ in ids if r != "param")
    return StateExport(model, out, len(ids) - n_moments, n_moments, step, total, time.monotonic() - t0)


def import_state(conn: psycopg.Connection, path: str | os.PathLike, model: str, *, config: str | None = None,
                 replace: bool = False, note: str | None = None, progress: bool = False) -> ImportResult:
    """Create model `model` from a file written by export_state (or any checkpoint pg-llm model import reads:
    then without moments, at step 0): parameters, moments and step, all or nothing."""
    return import_model(conn, path, model, config=config, replace=replace, note=note, progress=progress,
                        with_state=True)
