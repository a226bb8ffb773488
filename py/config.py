"""GPT-2 model configurations and the parameter tensors they imply (one source of truth for Python and SQL).

Parameter names are Hugging Face GPT-2 names without the "transformer." prefix. Linear weights keep the
HF Conv1D orientation [in, out], so a layer is exactly `x @ W + b`. The LM head is tied to wte.weight and not
stored; an untied config (tied_embeddings=False) adds lm_head.weight of shape (vocab_size, n_embd), i.e.
logits = x @ lm_head.weight.T like nn.Linear.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# A shape is a tuple of symbolic sizes: "V" vocab_size, "T" n_ctx, "C" n_embd, "3C", "4C".
Shape = tuple[str, ...]

EMBEDDINGS: tuple[tuple[str, Shape], ...] = (("wte.weight", ("V", "C")), ("wpe.weight", ("T", "C")))
# Per layer, in the order of a Hugging Face state dict: h.{i}.<suffix>.
LAYER: tuple[tuple[str, Shape], ...] = (
    ("ln_1.weight", ("C",)), ("ln_1.bias", ("C",)),
    ("attn.c_attn.weight", ("C", "3C")), ("attn.c_attn.bias", ("3C",)),
    ("attn.c_proj.weight", ("C", "C")), ("attn.c_proj.bias", ("C",)),
    ("ln_2.weight", ("C",)), ("ln_2.bias", ("C",)),
    ("mlp.c_fc.weight", ("C", "4C")), ("mlp.c_fc.bias", ("4C",)),
    ("mlp.c_proj.weight", ("4C", "C")), ("mlp.c_proj.bias", ("C",)),
)
FINAL: tuple[tuple[str, Shape], ...] = (("ln_f.weight", ("C",)), ("ln_f.bias", ("C",)))
UNTIED_HEAD: tuple[str, Shape] = ("lm_head.weight", ("V", "C"))
ACTIVATIONS = ("gelu_new",)  # tanh-approximated GELU; HF's "gelu_pytorch_tanh" is the same function


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    tied_embeddings: bool = True
    activation: str = "gelu_new"
    dropout: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"GPT2Config.{f} must be positive, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported (want one of {ACTIVATIONS})")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def size(self, sym: str) -> int:
        c = self.n_embd
        return {"V": self.vocab_size, "T": self.n_ctx, "C": c, "3C": 3 * c, "4C": 4 * c}[sym]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored parameter tensor, name -> shape, in canonical (HF state dict) order."""
        out = {n: tuple(self.size(s) for s in shp) for n, shp in EMBEDDINGS}
        for i in range(self.n_layer):
            out.update({f"h.{i}.{n}": tuple(self.size(s) for s in shp) for n, shp in LAYER})
        out.update({n: tuple(self.size(s) for s in shp) for n, shp in FINAL})
        if not self.tied_embeddings:
            out[UNTIED_HEAD[0]] = tuple(self.size(s) for s in UNTIED_HEAD[1])
        return out

    def n_params(self) -> int:
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> GPT2Config:
        """From a llm_model_config row (a dict; extra columns such as name/tokenizer are ignored)."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    # ---- Hugging Face config.json ---------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPT2Config:
        """From a Hugging Face GPT-2 config.json; refuses options that change the math we implement."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}, expected 'gpt2'")
        n_embd = int(d.get("n_embd", 768))
        unsupported = []
        if d.get("n_inner") not in (None, 4 * n_embd):
            unsupported.append(f"n_inner={d['n_inner']} (only 4 * n_embd)")
        if d.get("scale_attn_weights", True) is not True:
            unsupported.append("scale_attn_weights=false")
        if d.get("scale_attn_by_inverse_layer_idx", False):
            unsupported.append("scale_attn_by_inverse_layer_idx=true")
        if d.get("add_cross_attention", False):
            unsupported.append("add_cross_attention=true")
        act = d.get("activation_function", "gelu_new")
        if act == "gelu_pytorch_tanh":
            act = "gelu_new"
        if act not in ACTIVATIONS:
            unsupported.append(f"activation_function={act!r} (only gelu_new)")
        if unsupported:
            raise ValueError("config.json uses GPT-2 options pg_llm does not implement: " + ", ".join(unsupported))
        return cls(n_layer=int(d.get("n_layer", 12)), n_head=int(d.get("n_head", 12)), n_embd=n_embd,
                   n_ctx=int(d.get("n_positions", d.get("n_ctx", 1024))),
                   vocab_size=int(d.get("vocab_size", 50257)),
                   layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
                   tied_embeddings=bool(d.get("tie_word_embeddings", True)), activation=act,
                   dropout=float(d.get("resid_pdrop", 0.1)),
                   initializer_range=float(d.get("initializer_range", 0.02)))

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers' GPT2LMHeadModel.from_pretrained loads."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
            "n_positions": self.n_ctx, "vocab_size": self.vocab_size, "n_inner": None,
            "layer_norm_epsilon": self.layer_norm_epsilon, "activation_function": self.activation,
            "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
            "initializer_range": self.initializer_range, "tie_word_embeddings": self.tied_embeddings,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "dtype": "float32",
            # <|endoftext|> of the GPT-2 tokenizer, when the vocabulary has it
            "bos_token_id": 50256 if self.vocab_size > 50256 else None,
            "eos_token_id": 50256 if self.vocab_size > 50256 else None,
        }


# The standard rows of llm_model_config; gpt2-small is the default.
STANDARD: dict[str, GPT2Config] = {
    "gpt2-small": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}
DEFAULT_CONFIG = "gpt2-small"
