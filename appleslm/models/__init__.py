"""The model family: one architecture file (`appleslm.py`) and what every command asks of it."""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten

from appleslm.models import appleslm as _architecture
from appleslm.models import kernels as _kernels
from appleslm.models.appleslm import LeviathanGenerator, Model, ModelArgs, digit_base

# Our faster CPU training kernels for the installed architecture module (each switches itself
# on by backend: see kernels.enabled()); a model directory's own copy runs the plain ops.
_kernels.install(_architecture.KERNELS)

__all__ = ["LeviathanGenerator", "Model", "ModelArgs", "digit_base", "parameter_counts"]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts by role. Shapes only: nothing is evaluated, so a 1B preset costs nothing.

    "Embedding" parameters are the input table (or generator) plus an untied output head, the
    MobileLLM paper's convention; a tied table is counted once.
    """
    sizes = {name: value.size for name, value in tree_flatten(model.parameters())}
    embedding_prefixes = ("embed_tokens.", "embed_generator.", "lm_head.")
    embedding = sum(n for name, n in sizes.items() if name.startswith(embedding_prefixes))
    total = sum(sizes.values())
    args = model.args
    counts = {
        "params_total": total,
        "params_embedding": embedding,
        "params_non_embedding": total - embedding,
        "layers_unique": args.num_hidden_layers,
        "layers_executed": args.num_hidden_layers * args.layer_repeat,
    }
    if args.embedding == "leviathan":
        counts["params_generator"] = sum(
            n for name, n in sizes.items() if name.startswith("embed_generator.")
        )
    return counts
