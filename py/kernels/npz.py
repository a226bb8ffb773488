"""The .npz rules shared by the client loader (pg-llm model/checkpoint import) and the server functions
pg_llm_import_npz / pg_llm_export_npz (py/kernels/npz_server.py): one module, imported on both sides, so the
server applies the client's rules and the client's tests cover the server's code.

An .npz is a zip archive of .npy members (np.savez: stored; np.savez_compressed: deflated); a gzip-wrapped
.npz (`gzip w.npz`) is accepted too. Members are named like Hugging Face GPT-2 state-dict keys, with or
without "transformer." (attention-mask buffers h.N.attn.bias / masked_bias are ignored). pg_llm's own
checkpoint files add optimizer state as "adam_m/<name>", "adam_v/<name>" and a JSON metadata member
"__pg_llm__" (uint8 bytes: format, config, config_name, step, ...).
"""
from __future__ import annotations

import gzip
import io
import json
import zipfile

import numpy as np

META_KEY = "__pg_llm__"
STATE_ROLES = ("adam_m", "adam_v")


def normalize_name(name):
    """pg_llm's name for a checkpoint key, or None for the attention-mask buffers that are not parameters."""
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    p = name.split(".")
    if len(p) == 4 and p[0] == "h" and p[1].isdecimal() and p[2] == "attn" and p[3] in ("bias", "masked_bias"):
        return None
    return name


def npz_open(path):
    """np.load of an .npz (zip, stored or deflated; or gzip-wrapped), or ValueError saying why not."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        src = path
        if magic[:2] == b"\x1f\x8b":  # gzip around the zip: inflate into memory (zip needs seeking)
            with gzip.open(path, "rb") as g:
                data = g.read()
            magic, src = data[:4], io.BytesIO(data)
        if magic[:2] != b"PK":
            raise ValueError("not a zip archive (an .npz is written by np.savez or np.savez_compressed)")
        z = np.load(src, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read .npz ({e})") from e
    if not hasattr(z, "files"):
        raise ValueError(f"{path}: not an .npz archive of named arrays")
    return z


def npz_header(z, key):
    """(shape, dtype string) of one member from its .npy header, without reading the data."""
    fmt = np.lib.format
    with z.zip.open(key + ".npy") as f:
        version = fmt.read_magic(f)
        if version in ((1, 0), (2, 0)):
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            return tuple(int(d) for d in shape), str(dtype)
    a = z[key]  # another .npy version: read the member
    return tuple(int(d) for d in a.shape), str(a.dtype)


def npz_classify(keys):
    """Split member keys into (params {name: key}, state {(role, name): key}, meta key or None);
    ValueError when two keys name the same tensor."""
    params, state, meta = {}, {}, None
    for key in keys:
        if key == "__pg_llm__":
            meta = key
            continue
        role, _, rest = key.partition("/")
        if rest and role in ("adam_m", "adam_v"):
            name = normalize_name(rest)
            if name is not None:
                if (role, name) in state:
                    raise ValueError(f"tensor {role}/{name} appears twice (with and without 'transformer.'?)")
                state[(role, name)] = key
            continue
        name = normalize_name(key)
        if name is None:
            continue
        if name in params:
            raise ValueError(f"tensor {name!r} appears twice (with and without 'transformer.'?)")
        params[name] = key
    return params, state, meta


def npz_meta(z, key):
    """The JSON metadata member of a pg_llm checkpoint file, as a dict."""
    try:
        d = json.loads(bytes(np.asarray(z[key], dtype=np.uint8)).decode("utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"metadata member {key!r} is not JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"metadata member {key!r} is not a JSON object")
    return d


def npz_array(z, key):
    """A member as C-contiguous float32; ValueError for non-float data."""
    a = z[key]
    if a.dtype.kind != "f":
        raise ValueError(f"array {key!r} has dtype {a.dtype}; pg_llm reads floating point")
    with np.errstate(over="ignore"):  # float64 beyond float32 range becomes inf, rejected by the NaN check
        return np.ascontiguousarray(a, dtype=np.float32)


def infer_standard(shapes, rows):
    """(name of the first config row whose sizes match the tensor shapes or None, description of the sizes).
    rows: (name, n_layer, n_embd, n_ctx, vocab_size) in order of preference (the standard configs)."""
    if "wte.weight" not in shapes or "wpe.weight" not in shapes:
        return None, "no wte.weight/wpe.weight, so its size is unknown"
    (vocab, n_embd), (n_ctx, _) = shapes["wte.weight"][:2], shapes["wpe.weight"][:2]
    n_layer = sum(1 for n in shapes if n.endswith(".ln_1.weight"))
    sizes = f"n_layer={n_layer}, n_embd={n_embd}, n_ctx={n_ctx}, vocab_size={vocab}"
    for name, layers, embd, ctx, v in rows:
        if (layers, embd, ctx, v) == (n_layer, n_embd, n_ctx, vocab):
            return name, sizes
    return None, sizes


def shape_problems(expected, found, tied):
    """What keeps tensors `found` {name: shape} from being exactly the parameters `expected` {name: shape}
    (canonical order). A tied config tolerates lm_head.weight shaped like wte.weight (compared separately)."""
    found = dict(found)
    head = found.pop("lm_head.weight", None) if tied else None
    problems = []
    missing = [n for n in expected if n not in found]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    wrong = [f"{n} has shape {tuple(found[n])}, expected {tuple(s)}" for n, s in expected.items()
             if n in found and tuple(found[n]) != tuple(s)]
    if head is not None and tuple(head) != tuple(expected["wte.weight"]):
        wrong.append(f"lm_head.weight has shape {tuple(head)}, expected {tuple(expected['wte.weight'])}")
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    return problems


def npz_write(zf, key, arr):
    """Write one array as member key.npy of an open zipfile.ZipFile (what np.savez does, one at a time)."""
    with zf.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)


def meta_array(meta):
    """The metadata dict as the uint8 array stored under META_KEY."""
    return np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
