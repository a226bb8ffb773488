"""Read and write GPT-2 checkpoints on the client: Hugging Face directories (config.json + model.safetensors,
sharded safetensors, or pytorch_model.bin) and .npz files with the same tensor names.

safetensors is parsed here (8-byte header length, JSON header, raw little-endian data) over a read-only
memory map, so every tensor is read lazily, float16/bfloat16 need no torch, and a truncated or corrupt file
fails with a message naming the file and the tensor. Names are normalized to pg_llm's: the "transformer."
prefix is dropped and the attention-mask buffers (h.{i}.attn.bias, h.{i}.attn.masked_bias) are ignored.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from pg_llm.config import GPT2Config
from pg_llm.kernels.npz import STATE_ROLES, normalize_name, npz_array, npz_classify, npz_header, npz_meta, npz_open

PREFIX = "transformer."
SAFETENSORS_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}
MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; nothing was written."""


@dataclass
class Entry:
    """One tensor of a checkpoint: shape and source dtype known up front, data read on demand."""
    shape: tuple[int, ...]
    dtype: str
    source: str
    load: Callable[[], np.ndarray]

    def float32(self) -> np.ndarray:
        with np.errstate(over="ignore"):  # float64 beyond float32 range becomes inf, rejected by the NaN check
            return np.ascontiguousarray(self.load(), dtype=np.float32)


@dataclass
class Checkpoint:
    path: Path
    config: GPT2Config | None  # from config.json (or a pg_llm checkpoint's metadata) when there is one
    tensors: dict[str, Entry] = field(default_factory=dict)  # normalized name -> entry
    state: dict[tuple[str, str], Entry] = field(default_factory=dict)  # (adam_m|adam_v, name) -> entry
    meta: dict[str, Any] = field(default_factory=dict)  # a pg_llm checkpoint's metadata (step, config_name ...)

    @property
    def config_name(self) -> str | None:
        return self.meta.get("config_name")

    def use_meta(self, meta: dict[str, Any], source: str) -> None:
        """Take step, config name and config from a pg_llm checkpoint's metadata."""
        self.meta = meta
        if isinstance(meta.get("config"), dict):
            try:
                self.config = GPT2Config(**{f.name: meta["config"][f.name] for f in fields(GPT2Config)
                                            if f.name in meta["config"]})
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{source}: bad config in pg_llm metadata ({e})") from e


def normalize(name: str) -> str | None:
    """pg_llm's name for a checkpoint key, or None for buffers that are not parameters."""
    return normalize_name(name)


def _add(ckpt: Checkpoint, raw: str, entry: Entry) -> None:
    name = normalize(raw)
    if name is None:
        return
    if name in ckpt.tensors:
        raise CheckpointError(f"{entry.source}: tensor {name!r} appears twice (with and without {PREFIX!r}?)")
    ckpt.tensors[name] = entry


# ---- safetensors ---------------------------------------------------------------------------------------

def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path, ckpt: Checkpoint, only: Iterable[str] | None = None) -> None:
    """Add the tensors of one safetensors file (optionally only the raw names in `only`) to ckpt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base, data_len = 8 + n, size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if data_len > 0 else np.zeros(0, np.uint8)
    wanted = set(only) if only is not None else None
    for raw, info in header.items():
        if raw == "__metadata__" or (wanted is not None and raw not in wanted):
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {raw!r}") from e
        if normalize(raw) is None:
            continue
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {raw!r} has dtype {dtype}; pg_llm reads F32, F16, BF16, F64")
        np_dtype, item = SAFETENSORS_DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end or end - begin != count * item:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {raw!r} {shape} {dtype} spans "
                                  f"bytes [{begin}, {end})")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {raw!r} ends at data byte {end} "
                                  f"but the file holds {data_len}")

        def load(begin: int = begin, end: int = end, np_dtype: str = np_dtype, shape: tuple = shape,
                 bf16: bool = dtype == "BF16") -> np.ndarray:
            a = mm[base + begin:base + end].view(np_dtype).reshape(shape)
            return _bf16_to_f32(a) if bf16 else a

        _add(ckpt, raw, Entry(shape, dtype, str(path), load))


# ---- pytorch_model.bin and .npz ------------------------------------------------------------------------

def read_torch(path: Path, ckpt: Checkpoint) -> None:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch (or convert it to safetensors)") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a state dict")
    for raw, t in sd.items():
        if not isinstance(t, torch.Tensor) or normalize(raw) is None:
            continue
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {raw!r} has dtype {t.dtype}; pg_llm reads floating point")
        _add(ckpt, raw, Entry(tuple(t.shape), str(t.dtype).removeprefix("torch."), str(path),
                              lambda t=t: t.detach().to(torch.float32).numpy()))


def read_npz(path: Path, ckpt: Checkpoint) -> None:
    """Parameters, optimizer state (adam_m/NAME, adam_v/NAME) and pg_llm metadata of an .npz (see
    pg_llm.kernels.npz); only member headers are read here."""
    try:
        z = npz_open(path)
        params, state, meta = npz_classify(z.files)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from e

    def entry(key: str) -> Entry:
        try:
            shape, dtype = npz_header(z, key)
        except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{path}: cannot read array {key!r} ({e})") from e

        def load() -> np.ndarray:
            try:
                return npz_array(z, key)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise CheckpointError(f"{path}: cannot read array {key!r} ({e})") from e
        return Entry(shape, dtype, str(path), load)

    for name, key in params.items():
        _add(ckpt, name, entry(key))
    for role_name, key in state.items():
        ckpt.state[role_name] = entry(key)
    if meta is not None:
        try:
            ckpt.use_meta(npz_meta(z, meta), str(path))
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{path}: {e}") from e


def read_state_dir(p: Path, ckpt: Checkpoint) -> None:
    """A pg-llm checkpoint directory's optimizer.safetensors (adam_m/NAME, adam_v/NAME) and pg_llm.json."""
    if (p / "optimizer.safetensors").exists():
        opt = Checkpoint(p, None)
        read_safetensors(p / "optimizer.safetensors", opt)
        for key, e in opt.tensors.items():
            role, _, name = key.partition("/")
            if role not in STATE_ROLES or not name:
                raise CheckpointError(f"{e.source}: unexpected tensor {key!r} (want adam_m/NAME or adam_v/NAME)")
            ckpt.state[(role, normalize_name(name) or name)] = e
    if (p / "pg_llm.json").exists():
        ckpt.use_meta(_config_json(p / "pg_llm.json"), str(p / "pg_llm.json"))


# ---- opening a checkpoint ------------------------------------------------------------------------------

def _config_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {path.name} ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: {path.name} is not a JSON object")
    return d


def _index(path: Path) -> dict[str, list[str]]:
    """shard file -> raw tensor names, from a *.index.json weight map."""
    d = _config_json(path)
    if not isinstance(d.get("weight_map"), dict):
        raise CheckpointError(f"{path}: no weight_map")
    shards: dict[str, list[str]] = {}
    for raw, shard in d["weight_map"].items():
        shards.setdefault(shard, []).append(raw)
    return shards


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A Hugging Face GPT-2 directory, a .safetensors/.bin file (with config.json beside it, if any), or an .npz."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: model weights are a Hugging Face directory (with "
                              "config.json and model.safetensors), a .safetensors/.bin file or an .npz")
    d = p if p.is_dir() else p.parent
    cfg_json = _config_json(d / "config.json") if (d / "config.json").exists() else None
    try:
        cfg = GPT2Config.from_hf(cfg_json) if cfg_json is not None else None
    except ValueError as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from e
    ckpt = Checkpoint(p, cfg)
    if p.is_file():
        if p.suffix == ".npz" or p.name.endswith(".npz.gz"):
            read_npz(p, ckpt)
        elif p.suffix == ".safetensors":
            read_safetensors(p, ckpt)
        elif p.suffix in (".bin", ".pt", ".pth"):
            read_torch(p, ckpt)
        else:
            raise CheckpointError(f"{p}: not a checkpoint (want a Hugging Face directory, .safetensors, .bin or .npz)")
    elif (p / "model.safetensors").exists():
        read_safetensors(p / "model.safetensors", ckpt)
    elif (p / "model.safetensors.index.json").exists():
        for shard, names in _index(p / "model.safetensors.index.json").items():
            read_safetensors(p / shard, ckpt, only=names)
    elif (p / "pytorch_model.bin").exists():
        read_torch(p / "pytorch_model.bin", ckpt)
    elif (p / "pytorch_model.bin.index.json").exists():
        for shard in _index(p / "pytorch_model.bin.index.json"):
            read_torch(p / shard, ckpt)
    else:
        raise CheckpointError(f"{p}: no model.safetensors or pytorch_model.bin in this directory")
    if p.is_dir():
        read_state_dir(p, ckpt)
    if not ckpt.tensors:
        raise CheckpointError(f"{p}: the checkpoint holds no tensors")
    return ckpt


# ---- writing a Hugging Face directory ------------------------------------------------------------------

def safetensors_header(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """Header (length prefix + JSON padded to 8 bytes) for float32 tensors stored contiguously in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
