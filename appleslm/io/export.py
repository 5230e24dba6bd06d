"""Export to a plain mlx-lm `llama` checkpoint, for people who do not use appleslm.

The Leviathan generator is evaluated once into an ordinary embedding table, and shared blocks are
unrolled into one block per execution, so stock `mlx_lm.load` needs no custom code
(no `trust_remote_code`) and gives the same logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from appleslm.io.files import ModelDirError, read_config, read_provenance
from appleslm.io.model_dir import (
    check_output_dir,
    display_name,
    load_model,
    model_reference,
    resolve_model,
    save_model_dir,
)


def llama_config(args: Any, eos_token_id: Any) -> dict[str, Any]:
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
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def llama_weights(model: nn.Module) -> dict[str, Any]:
    """Our weight names -> llama's, with block i copied to every execution slot it fills."""
    params = dict(tree_flatten(model.parameters()))
    weights = {
        "model.embed_tokens.weight": params["embed_tokens.weight"],
        "model.norm.weight": params["norm.weight"],
    }
    if "lm_head.weight" in params:
        weights["lm_head.weight"] = params["lm_head.weight"]
    repeat = model.args.layer_repeat
    for name, value in params.items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            for copy in range(repeat):
                weights[f"model.layers.{int(index) * repeat + copy}.{rest}"] = value
    return weights


def export_llama(model_spec: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
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
    model = model.materialize()
    exported_config = llama_config(model.args, config.get("eos_token_id"))
    exported = llama.Model(llama.ModelArgs.from_dict(exported_config))
    exported.load_weights(list(llama_weights(model).items()), strict=True)
    provenance = read_provenance(model_dir)
    provenance.name = display_name(out_dir)
    provenance.base_model = model_reference(model_spec, model_dir)
    provenance.exported_from = {
        "model_type": "appleslm",
        "embedding": model.args.embedding,
        "layer_repeat": config.get("layer_repeat", 1),
    }
    return save_model_dir(
        out_dir,
        exported,
        tokenizer_dir=model_dir,
        provenance=provenance,
        config=exported_config,
        overwrite=overwrite,
    )
