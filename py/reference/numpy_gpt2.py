"""GPT-2 in plain numpy: forward (logits, mean cross-entropy) and backward (a gradient for every parameter).

The test oracle for the SQL forward pass and for training. Parameters are a dict of Hugging Face GPT-2 names
without the "transformer." prefix (see pg_llm.config.GPT2Config.param_shapes): Conv1D weights are [in, out],
so every linear layer is `x @ W + b`; the LM head is wte (or lm_head.weight when untied). float32 by default,
dtype=np.float64 for a high-precision oracle. Written nanoGPT-style: one idea per function.

    logits, loss = forward(params, idx, cfg, targets)        # idx, targets: (B, T) ints; targets < 0 ignored
    loss, grads = loss_and_grads(params, idx, targets, cfg)   # grads[name] has params[name]'s shape
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pg_llm.config import GPT2Config

Params = dict[str, np.ndarray]
GELU_K = float(np.sqrt(2.0 / np.pi))  # a Python float keeps float32 math in float32


def normalize_params(state_dict: dict[str, Any]) -> Params:
    """HF state dict (torch tensors or arrays, with or without 'transformer.') -> numpy params, buffers and a
    tied lm_head.weight dropped."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("transformer.")
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        out[k] = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    return out


def cast(params: Params, cfg: GPT2Config, dtype: Any) -> Params:
    """The parameters the config needs, checked and converted to dtype."""
    out = {}
    for name, shape in cfg.param_shapes().items():
        if name not in params:
            raise KeyError(f"missing parameter {name!r}")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(params[name].shape)}, expected {shape}")
        out[name] = np.asarray(params[name], dtype=dtype)
    return out


def head_weight(cfg: GPT2Config) -> str:
    return "wte.weight" if cfg.tied_embeddings else "lm_head.weight"


# ---- building blocks: forward returns (output, cache), backward takes (grad, cache) ----------------------

def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> tuple[np.ndarray, tuple]:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd, w)


def layer_norm_backward(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xhat, rstd, w = cache
    dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)
    db = dy.reshape(-1, dy.shape[-1]).sum(0)
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, dw, db


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x @ w + b


def linear_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dy @ w.T, x2.T @ dy2, dy2.sum(0)


def gelu_new(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU used by GPT-2."""
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + 0.044715 * x ** 3)))


def gelu_new_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    t = np.tanh(GELU_K * (x + 0.044715 * x ** 3))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3 * 0.044715 * x * x))


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- causal self-attention -------------------------------------------------------------------------------

def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, nh, T, hs)


def merge_heads(x: np.ndarray) -> np.ndarray:
    B, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


def attention(qkv: np.ndarray, n_head: int) -> tuple[np.ndarray, tuple]:
    """qkv (B, T, 3C) -> y (B, T, C): softmax(q k^T / sqrt(hs) + causal mask) v, per head."""
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3))
    T, scale = q.shape[2], 1.0 / float(np.sqrt(q.shape[-1]))
    s = (q @ k.transpose(0, 1, 3, 2)) * scale
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    att = softmax(s)
    return merge_heads(att @ v), (q, k, v, att, scale)


def attention_backward(dy: np.ndarray, cache: tuple) -> np.ndarray:
    q, k, v, att, scale = cache
    dyh = split_heads(dy, q.shape[1])
    dv = att.transpose(0, 1, 3, 2) @ dyh
    datt = dyh @ v.transpose(0, 1, 3, 2)
    ds = att * (datt - (datt * att).sum(-1, keepdims=True)) * scale  # masked entries have att = 0
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


# ---- one transformer block -------------------------------------------------------------------------------

def block(x: np.ndarray, p: Params, i: int, cfg: GPT2Config) -> tuple[np.ndarray, dict]:
    h = f"h.{i}."
    eps = cfg.layer_norm_epsilon
    a_in, ln1 = layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
    qkv = linear(a_in, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
    y, att = attention(qkv, cfg.n_head)
    x = x + linear(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
    m_in, ln2 = layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
    f = linear(m_in, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
    g = gelu_new(f)
    x = x + linear(g, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    return x, dict(a_in=a_in, ln1=ln1, y=y, att=att, m_in=m_in, ln2=ln2, f=f, g=g)


def block_backward(dx: np.ndarray, p: Params, i: int, c: dict, grads: Params) -> np.ndarray:
    h = f"h.{i}."
    # MLP branch: x + c_proj(gelu(c_fc(ln_2(x))))
    dg, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = linear_backward(
        dx, c["g"], p[h + "mlp.c_proj.weight"])
    df = gelu_new_backward(dg, c["f"])
    dm_in, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = linear_backward(
        df, c["m_in"], p[h + "mlp.c_fc.weight"])
    dln, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layer_norm_backward(dm_in, c["ln2"])
    dx = dx + dln
    # attention branch: x + c_proj(attn(c_attn(ln_1(x))))
    dy, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = linear_backward(
        dx, c["y"], p[h + "attn.c_proj.weight"])
    dqkv = attention_backward(dy, c["att"])
    da_in, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = linear_backward(
        dqkv, c["a_in"], p[h + "attn.c_attn.weight"])
    dln, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layer_norm_backward(da_in, c["ln1"])
    return dx + dln


# ---- the model -----------------------------------------------------------------------------------------

def check_tokens(idx: np.ndarray, cfg: GPT2Config) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 2:
        raise ValueError(f"idx must be (B, T), got shape {idx.shape}")
    if idx.shape[1] > cfg.n_ctx:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds n_ctx={cfg.n_ctx}")
    if idx.size and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
    return idx


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over targets >= 0, and its gradient w.r.t. logits."""
    V = logits.shape[-1]
    lg, tg = logits.reshape(-1, V), np.asarray(targets).reshape(-1)
    valid = tg >= 0
    n = max(int(valid.sum()), 1)
    m = lg.max(-1, keepdims=True)
    e = np.exp(lg - m)
    se = e.sum(-1, keepdims=True)
    rows = np.nonzero(valid)[0]
    lse = (m + np.log(se))[rows, 0]  # log-sum-exp: loss = lse - logit of the target
    loss = (lse - lg[rows, tg[rows]]).astype(np.float64).sum() / n
    dlogits = (e / se) * valid[:, None]
    dlogits[rows, tg[rows]] -= 1.0
    return float(loss), (dlogits / n).reshape(logits.shape).astype(logits.dtype)


def _forward(p: Params, idx: np.ndarray, cfg: GPT2Config) -> tuple[np.ndarray, dict]:
    T = idx.shape[1]
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]
    caches = []
    for i in range(cfg.n_layer):
        x, c = block(x, p, i, cfg)
        caches.append(c)
    xf, lnf = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], cfg.layer_norm_epsilon)
    logits = xf @ p[head_weight(cfg)].T
    return logits, dict(idx=idx, blocks=caches, xf=xf, lnf=lnf)


def forward(params: Params, idx: np.ndarray, cfg: GPT2Config, targets: np.ndarray | None = None, *,
            dtype: Any = np.float32) -> tuple[np.ndarray, float | None]:
    """logits (B, T, vocab_size) and, with targets, the mean cross-entropy loss."""
    p = cast(params, cfg, dtype)
    logits, _ = _forward(p, check_tokens(idx, cfg), cfg)
    loss = cross_entropy(logits, targets)[0] if targets is not None else None
    return logits, loss


def loss_and_grads(params: Params, idx: np.ndarray, targets: np.ndarray, cfg: GPT2Config, *,
                   dtype: Any = np.float32) -> tuple[float, Params]:
    """Mean cross-entropy and d loss / d param for every parameter of the config (same names and shapes)."""
    p = cast(params, cfg, dtype)
    idx = check_tokens(idx, cfg)
    logits, c = _forward(p, idx, cfg)
    loss, dlogits = cross_entropy(logits, targets)
    grads: Params = {}
    head = head_weight(cfg)
    dxf = dlogits @ p[head]
    dhead = dlogits.reshape(-1, cfg.vocab_size).T @ c["xf"].reshape(-1, cfg.n_embd)
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layer_norm_backward(dxf, c["lnf"])
    for i in reversed(range(cfg.n_layer)):
        dx = block_backward(dx, p, i, c["blocks"][i], grads)
    dwte = np.zeros_like(p["wte.weight"])
    np.add.at(dwte, idx, dx)
    if cfg.tied_embeddings:
        dwte += dhead
    else:
        grads["lm_head.weight"] = dhead
    grads["wte.weight"] = dwte
    dwpe = np.zeros_like(p["wpe.weight"])
    dwpe[:idx.shape[1]] = dx.sum(0)
    grads["wpe.weight"] = dwpe
    return loss, {n: grads[n] for n in cfg.param_shapes()}
