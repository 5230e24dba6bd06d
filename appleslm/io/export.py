"""Export to a stock mlx-lm checkpoint (`llama`, or `mixtral` for MoE), for people who do not use
appleslm.

A computed input embedder (Leviathan generator, byte encoder) is evaluated once into an ordinary
embedding table, and shared blocks and a shared FFN are unrolled into one block per execution, so
stock `mlx_lm.load` needs no custom code (no `trust_remote_code`) and gives the same logits. A
byte-level head cannot be exported: it scores each id from its bytes, which no linear head does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama, mixtral

from appleslm.io.files import ModelDirError, read_config, read_provenance
from appleslm.io.model_dir import (
    check_output_dir,
    display_name,
    load_model,
    model_reference,
    resolve_model,
    save_model_dir,
)

# Our MoE FFN's names inside a block -> mlx-lm mixtral's.
MIXTRAL_NAMES = {
    "mlp.router.": "block_sparse_moe.gate.",
    "mlp.experts.": "block_sparse_moe.switch_mlp.",
}


def stock_config(args: Any, eos_token_id: Any) -> dict[str, Any]:
    """The `llama` config of a dense model, the `mixtral` config of an MoE model."""
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers * args.layer_repeat,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if args.num_experts:
        config |= {
            "model_type": "mixtral",
            "architectures": ["MixtralForCausalLM"],
            "num_local_experts": args.num_experts,
            "num_experts_per_tok": args.num_experts_per_tok,
            # HF Mixtral's balance term sums its expert shares to k, ours to 1 (router_losses).
            "router_aux_loss_coef": args.router_aux_loss_coef / args.num_experts_per_tok,
        }
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def stock_weights(model: nn.Module) -> dict[str, Any]:
    """Our weight names -> llama's or mixtral's, one block per execution: block i is copied to
    every slot it fills, and a shared FFN into every block."""
    params = dict(tree_flatten(model.parameters()))
    weights = {
        "model.embed_tokens.weight": params["embed_tokens.weight"],
        "model.norm.weight": params["norm.weight"],
    }
    if "lm_head.weight" in params:
        weights["lm_head.weight"] = params["lm_head.weight"]
    shared_ffn = {
        "mlp." + name.removeprefix("shared_mlp."): value
        for name, value in params.items()
        if name.startswith("shared_mlp.")
    }
    renames = MIXTRAL_NAMES if model.args.num_experts else {}
    repeat = model.args.layer_repeat
    for block in range(model.args.num_hidden_layers):
        prefix = f"layers.{block}."
        own = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
        for name, value in (own | shared_ffn).items():
            for ours, theirs in renames.items():
                if name.startswith(ours):
                    name = theirs + name.removeprefix(ours)
            for slot in range(block * repeat, (block + 1) * repeat):
                weights[f"model.layers.{slot}.{name}"] = value
    return weights


def check_exportable(args: Any, model_dir: Path) -> None:
    if args.head == "bytes":
        raise ModelDirError(
            f"{model_dir} has a byte-level head (head: bytes), which scores each token from its "
            "bytes and cannot become a linear head, so no stock llama or mixtral can hold it. "
            "Share the model directory itself: stock mlx-lm loads it with "
            "mlx_lm.load(path, trust_remote_code=True)"
        )
    if args.num_experts and args.head_dim != args.hidden_size // args.num_attention_heads:
        raise ModelDirError(
            f"{model_dir}: mlx-lm's mixtral fixes head_dim to hidden_size / num_attention_heads "
            f"({args.hidden_size // args.num_attention_heads}), this model has head_dim "
            f"{args.head_dim}; it cannot be exported as mixtral"
        )


def export_stock(model_spec: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    check_output_dir(Path(out_dir), overwrite)
    model_dir = resolve_model(model_spec)
    config = read_config(model_dir)
    if config.get("model_type") != "appleslm":
        raise ModelDirError(
            f"{model_dir} is not an appleslm model (model_type "
            f"{config.get('model_type')!r}); mlx-lm loads it as it is"
        )
    if "quantization" in config:
        raise ModelDirError(
            f"{model_dir} is quantized: export the float model, then quantize the export"
        )
    model, _ = load_model(model_dir)
    check_exportable(model.args, model_dir)
    model = model.materialize()
    exported_config = stock_config(model.args, config.get("eos_token_id"))
    family = mixtral if model.args.num_experts else llama
    exported = family.Model(family.ModelArgs.from_dict(exported_config))
    exported.load_weights(list(stock_weights(model).items()), strict=True)
    provenance = read_provenance(model_dir)
    provenance.name = display_name(out_dir)
    provenance.base_model = model_reference(model_spec, model_dir)
    provenance.exported_from = {
        "model_type": "appleslm",
        "embedding": config.get("embedding", "table"),
        "layer_repeat": config.get("layer_repeat", 1),
        "share_ffn": config.get("share_ffn", False),
        "num_experts": config.get("num_experts", 0),
    }
    return save_model_dir(
        out_dir,
        exported,
        tokenizer_dir=model_dir,
        provenance=provenance,
        config=exported_config,
        overwrite=overwrite,
    )
