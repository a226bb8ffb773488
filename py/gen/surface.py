"""The documented SQL API (docs/sql-api.md): these functions live in pg_llm's schema, where users call them.
Every other function the generator emits (microkernels, recording wrappers, the tape, loop and loader helpers)
is created in the schema INTERNAL, outside the user's namespace, with EXECUTE revoked from PUBLIC (py/gen/access.py).
A new function is internal unless it is named here, so the API grows only on purpose."""
from __future__ import annotations

INTERNAL = "llm_internal"

# Roles (docs/access.md): readers run inference and read every table; trainers (readers too) create and train
# models, configs, datasets and checkpoints of their own or granted to them; admins change anything.
ADMIN_ROLE, TRAINER_ROLE, READER_ROLE = "llm_admin", "llm_trainer", "llm_reader"
# The owner column of every owned table: a role OID (a dropped role's rows then belong to nobody but admins).
OWNER = "owner REGROLE NOT NULL DEFAULT CURRENT_USER::TEXT::REGROLE"

_OPS = ("add", "add_bias", "attention", "cross_entropy", "dropout", "embedding", "gelu", "layernorm", "linear",
        "matmul", "mul", "scale", "softmax_causal", "sum_cols", "sum_rows")

PUBLIC = frozenset({
    # models and inference
    "llm_model_create", "llm_model_init", "llm_model_drop", "llm_model_grant", "llm_model_revoke",
    "llm_logits", "llm_logits_all", "llm_loss", "llm_perplexity", "llm_perplexity_tokens", "llm_perplexity_texts",
    "llm_generate", "llm_generate_tokens", "llm_generate_stream",
    # tokenizer and training data
    "llm_encode", "llm_decode", "llm_decode_bytes", "llm_tokenize", "llm_bpe_cache_clear", "llm_bpe_pattern",
    "llm_bpe_pieces", "llm_utf8_lossy", "llm_dataset_drop",
    # training, checkpoints, weight files
    "llm_train_step", "llm_train", "llm_train_run", "llm_train_check", "llm_eval_loss", "llm_lr_at",
    "llm_checkpoint_save", "llm_checkpoint_load", "llm_checkpoint_drop", "pg_llm_import_npz", "pg_llm_export_npz",
    # scale-out: a cluster of ranks (docs/scaleout.md)
    "llm_cluster_add", "llm_cluster_drop", "llm_cluster_check", "llm_cluster_sync",
    "llm_cluster_generate", "llm_cluster_perplexity", "llm_cluster_perplexity_texts", "llm_cluster_route",
    "llm_cluster_train_step", "llm_cluster_train_run", "llm_cluster_recover",
    # tensors and kernels (each op with its backward)
    "llm_tensor_create", "llm_tensor", "llm_param", "llm_tensor_drop", "llm_tile_values", "llm_tile_values_2d",
    "llm_tensor_rows", "llm_tensor_validate", "llm_adamw_step", "llm_global_grad_norm", "llm_clip_coef",
    "llm_scratch_mark", "llm_scratch_release", "llm_scratch_clear", "llm_weight_cache_stats",
    "llm_weight_cache_clear", "llm_doctor", "llm_build",
    *(f"llm_{op}" for op in _OPS), *(f"llm_{op}_backward" for op in _OPS),
})


def qualified(name: str) -> str:
    """Where the generator creates function `name`: pg_llm's schema (found through the caller's search_path,
    as installed) for the API, INTERNAL for the rest (found by pg_llm's own functions, whose search_path
    names INTERNAL)."""
    return name if name in PUBLIC else f"{INTERNAL}.{name}"
