"""The numpy GPT-2 reference (pg_llm.reference.numpy_gpt2) against transformers: logits, loss, and every
parameter gradient against torch autograd. No database needed."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads exist here

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel

from pg_llm.config import GPT2Config
from pg_llm.reference import numpy_gpt2 as ref

# sizes that are not multiples of anything convenient; the last one is untied
CONFIGS = {
    "tiny": GPT2Config(n_layer=2, n_head=3, n_embd=48, n_ctx=37, vocab_size=301),
    "odd": GPT2Config(n_layer=3, n_head=5, n_embd=40, n_ctx=23, vocab_size=97, layer_norm_epsilon=1e-4),
    "untied": GPT2Config(n_layer=1, n_head=2, n_embd=12, n_ctx=9, vocab_size=53, tied_embeddings=False),
}


def hf_model(cfg: GPT2Config, dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    hf = HFConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_ctx,
                  vocab_size=cfg.vocab_size, layer_norm_epsilon=cfg.layer_norm_epsilon,
                  tie_word_embeddings=cfg.tied_embeddings, attn_implementation="eager")
    m = GPT2LMHeadModel(hf)
    with torch.no_grad():
        for p in m.parameters():  # larger-than-init weights so every path matters
            p.add_(0.2 * torch.randn_like(p))
    return m.to(dtype).eval()


def batch(cfg: GPT2Config, B: int = 3, T: int | None = None, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    T = T or cfg.n_ctx
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :2] = -1  # ignored positions
    return idx, targets


def torch_loss(m: GPT2LMHeadModel, idx: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    logits = m(torch.as_tensor(idx)).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1),
                           ignore_index=-1)
    return logits, loss


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [None, 5])
def test_forward_matches_transformers(name: str, T: int | None) -> None:
    cfg = CONFIGS[name]
    m = hf_model(cfg)
    idx, targets = batch(cfg, T=T)
    with torch.no_grad():
        want_logits, want_loss = torch_loss(m, idx, targets)
    logits, loss = ref.forward(ref.normalize_params(m.state_dict()), idx, cfg, targets)
    assert logits.dtype == np.float32 and logits.shape == (3, T or cfg.n_ctx, cfg.vocab_size)
    assert np.abs(logits - want_logits.numpy()).max() <= 1e-4
    assert abs(loss - want_loss.item()) <= 1e-5 * abs(want_loss.item())


def test_forward_float64() -> None:
    cfg = CONFIGS["tiny"]
    m = hf_model(cfg, torch.float64)
    idx, targets = batch(cfg)
    with torch.no_grad():
        want_logits, want_loss = torch_loss(m, idx, targets)
    logits, loss = ref.forward(ref.normalize_params(m.state_dict()), idx, cfg, targets, dtype=np.float64)
    assert logits.dtype == np.float64
    assert np.abs(logits - want_logits.numpy()).max() <= 1e-10
    assert abs(loss - want_loss.item()) <= 1e-12 * abs(want_loss.item())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_backward_matches_autograd_float64(name: str) -> None:
    cfg = CONFIGS[name]
    m = hf_model(cfg, torch.float64)
    idx, targets = batch(cfg, T=cfg.n_ctx - 2)
    _, want_loss = torch_loss(m, idx, targets)
    want_loss.backward()
    want = {k.removeprefix("transformer."): p.grad.numpy() for k, p in m.named_parameters()}
    loss, grads = ref.loss_and_grads(ref.normalize_params(m.state_dict()), idx, targets, cfg, dtype=np.float64)
    assert abs(loss - want_loss.item()) <= 1e-12 * want_loss.item()
    assert list(grads) == list(cfg.param_shapes())
    for n, g in grads.items():
        assert g.shape == cfg.param_shapes()[n] and g.dtype == np.float64, n
        scale = max(np.abs(want[n]).max(), 1e-3)
        assert np.abs(g - want[n]).max() <= 1e-9 * scale, n


def test_backward_float32_close() -> None:
    cfg = CONFIGS["tiny"]
    m = hf_model(cfg)
    idx, targets = batch(cfg)
    _, want_loss = torch_loss(m, idx, targets)
    want_loss.backward()
    want = {k.removeprefix("transformer."): p.grad.numpy() for k, p in m.named_parameters()}
    _, grads = ref.loss_and_grads(ref.normalize_params(m.state_dict()), idx, targets, cfg)
    for n, g in grads.items():
        assert g.dtype == np.float32, n
        assert np.abs(g - want[n]).max() <= 1e-4 * max(1.0, np.abs(want[n]).max()), n


def test_errors() -> None:
    cfg = CONFIGS["tiny"]
    params = ref.normalize_params(hf_model(cfg).state_dict())
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        ref.forward(params, np.zeros((1, 38), int), cfg)
    with pytest.raises(ValueError, match="token ids"):
        ref.forward(params, np.full((1, 3), 301), cfg)
    with pytest.raises(KeyError, match="ln_f.bias"):
        ref.forward({k: v for k, v in params.items() if k != "ln_f.bias"}, np.zeros((1, 3), int), cfg)
    with pytest.raises(ValueError, match="wpe.weight"):
        ref.forward({**params, "wpe.weight": params["wpe.weight"][:5]}, np.zeros((1, 3), int), cfg)
