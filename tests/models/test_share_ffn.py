"""FFN sharing across all blocks (STLM, MobiLlama): one FFN, used by every block."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from appleslm.models import parameter_counts
from tests.helpers import build_tiny


def tokens(length: int = 10) -> mx.array:
    return mx.array(np.random.default_rng(1).integers(0, 300, size=(2, length)))


@pytest.mark.parametrize("layer_repeat", [1, 2])
def test_shared_ffn_equals_blocks_holding_copies_of_one_ffn(layer_repeat):
    shared = build_tiny(share_ffn=True, layer_repeat=layer_repeat)
    copies = build_tiny(seed=1, layer_repeat=layer_repeat)
    params = dict(tree_flatten(shared.parameters()))
    ffn = [(k.removeprefix("shared_mlp."), v) for k, v in params.items() if "shared_mlp" in k]
    own = [(k, v) for k, v in params.items() if "shared_mlp" not in k]
    copied = [(f"layers.{i}.mlp.{k}", v) for i in range(len(copies.layers)) for k, v in ffn]
    copies.load_weights(own + copied, strict=True)
    x = tokens()
    assert mx.allclose(shared(x), copies(x), atol=1e-5).item()

    # Tied weights: the shared FFN's gradient is the sum of what each copy would receive.
    def loss(m):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    g_shared = dict(tree_flatten(nn.value_and_grad(shared, loss)(shared)[1]))
    g_copies = dict(tree_flatten(nn.value_and_grad(copies, loss)(copies)[1]))
    for name, _ in ffn:
        summed = sum(g_copies[f"layers.{i}.mlp.{name}"] for i in range(len(copies.layers)))
        assert mx.allclose(g_shared[f"shared_mlp.{name}"], summed, atol=1e-6).item(), name


def test_shared_ffn_is_counted_once():
    dense, shared = parameter_counts(build_tiny()), parameter_counts(build_tiny(share_ffn=True))
    ffn = 3 * 64 * 128
    assert dense["params_total"] - shared["params_total"] == ffn  # 2 blocks -> 1 FFN
    assert shared["params_embedding"] == dense["params_embedding"]
    moe = parameter_counts(build_tiny(share_ffn=True, num_experts=4, num_experts_per_tok=1))
    assert moe["params_total"] - moe["params_active"] == 3 * ffn  # one MoE, 3 idle experts
    names = [name for name, _ in tree_flatten(build_tiny(share_ffn=True).parameters())]
    assert not any(".mlp." in name for name in names)
