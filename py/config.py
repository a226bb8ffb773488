"""GPT-2 model configurations, the block they repeat and the parameter tensors they imply, and the training
hyperparameters (one source of truth for Python and SQL).

Parameter names are Hugging Face GPT-2 names without the "transformer." prefix. Linear weights keep the
HF Conv1D orientation [in, out], so a layer is exactly `x @ W + b`. The LM head is tied to wte.weight and not
stored; an untied config (tied_embeddings=False) adds lm_head.weight of shape (vocab_size, n_embd), i.e.
logits = x @ lm_head.weight.T like nn.Linear.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# A shape is a tuple of symbolic sizes: "V" vocab_size, "T" n_ctx, "C" n_embd, "3C", "4C".
Shape = tuple[str, ...]

@dataclass(frozen=True)
class Step:
    """One step of the GPT-2 block (nanoGPT's `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`): a LayerNorm or a
    Conv1D layer named like its parameters (prefix within a layer, e.g. 'attn.c_attn'), or the attention."""
    op: str  # 'layernorm', 'linear' or 'attention'
    name: str = ""  # parameter prefix: h.{i}.<name>.weight / .bias
    shapes: tuple[Shape, ...] = ()  # (weight, bias)
    gelu: bool = False  # linear: GELU after it
    residual: bool = False  # linear: closes a residual branch, x = x + dropout(out)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{p}" for p in ("weight", "bias")[:len(self.shapes)])


# The block, once: the training/inference forward (api/gpt2.py), the cached decoding chain (api/generate.py)
# and the fused decoding step's parameter order (ops/block_step.py) are generated from it.
BLOCK: tuple[Step, ...] = (
    Step("layernorm", "ln_1", (("C",), ("C",))),
    Step("linear", "attn.c_attn", (("C", "3C"), ("3C",))),
    Step("attention"),
    Step("linear", "attn.c_proj", (("C", "C"), ("C",)), residual=True),
    Step("layernorm", "ln_2", (("C",), ("C",))),
    Step("linear", "mlp.c_fc", (("C", "4C"), ("4C",)), gelu=True),
    Step("linear", "mlp.c_proj", (("4C", "C"), ("C",)), residual=True),
)
LN_F = Step("layernorm", "ln_f", (("C",), ("C",)))

WTE, WPE = "wte.weight", "wpe.weight"
EMBEDDINGS: tuple[tuple[str, Shape], ...] = ((WTE, ("V", "C")), (WPE, ("T", "C")))
# Per layer, in the order of a Hugging Face state dict (the block's): h.{i}.<suffix>.
LAYER: tuple[tuple[str, Shape], ...] = tuple(kv for s in BLOCK for kv in zip(s.params, s.shapes, strict=True))
FINAL: tuple[tuple[str, Shape], ...] = tuple(zip(LN_F.params, LN_F.shapes, strict=True))
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


def hyper(default: Any, sql: str, cond: str, what: str, nullable: bool = False) -> Any:
    """A TrainConfig field: its default, SQL type, the SQL condition it must meet ({v} the value, {lr} lr), how
    that reads in an error, and whether NULL means something (else it is refused). Floats must also be finite."""
    return field(default=default, metadata={"sql": sql, "cond": cond, "what": what, "nullable": nullable})


@dataclass(frozen=True)
class TrainConfig:
    """The GPT-2 training recipe's hyperparameters, each once with its default and its bound: the SQL arguments
    of llm_train_step, SELECT llm_train and CALL llm_train_run, and what llm_train_check enforces."""
    lr: float = hyper(2.5e-4, "FLOAT8", "{v} > 0", "> 0")
    warmup_steps: int = hyper(2000, "INT", "{v} >= 0", ">= 0")
    max_steps: int | None = hyper(None, "INT", "{v} >= 1", ">= 1 (or NULL: the run's own number of steps)", True)
    min_lr: float | None = hyper(None, "FLOAT8", "{v} >= 0 AND {v} <= {lr}", "between 0 and lr (or NULL: 0.1 x lr)",
                                 True)
    weight_decay: float = hyper(0.01, "FLOAT8", "{v} >= 0", ">= 0")
    beta1: float = hyper(0.9, "FLOAT8", "{v} >= 0 AND {v} < 1", "in [0, 1)")
    beta2: float = hyper(0.999, "FLOAT8", "{v} >= 0 AND {v} < 1", "in [0, 1)")
    eps: float = hyper(1e-8, "FLOAT8", "{v} > 0", "> 0")
    grad_clip: float | None = hyper(1.0, "FLOAT8", "{v} >= 0", ">= 0 (0 or NULL: no clipping)", True)
    dropout: float = hyper(0.1, "FLOAT8", "{v} >= 0 AND {v} < 1", "in [0, 1)")
    grad_accum: int = hyper(1, "INT", "{v} >= 1", ">= 1")
    seed: int = hyper(1337, "BIGINT", "{v} >= 0", ">= 0")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def sql_types(cls) -> dict[str, str]:
        return {f.name: f.metadata["sql"] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The non-NULL defaults (NULL ones mean something: see each field's what)."""
        return {f.name: f.default for f in fields(cls) if f.default is not None}

    @classmethod
    def sql_args(cls) -> str:
        """'lr FLOAT8 DEFAULT 0.00025, warmup_steps INT DEFAULT 2000, ...' for a function's argument list."""
        return ", ".join(f"{f.name} {f.metadata['sql']} DEFAULT {'NULL' if f.default is None else repr(f.default)}"
                         for f in fields(cls))
