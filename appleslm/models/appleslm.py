"""The appleslm decoder family, on mlx-lm's model skeleton.

One Llama-style body (pre-RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases) with the knobs
the small-model papers turn:
  - MobileLLM: deep-and-thin shapes, tied input/output embedding, and immediate block-wise weight
    sharing (`layer_repeat`: each unique block runs that many times in a row, 1,1,2,2,...).
  - Leviathan (Batley & Saha, 2026): the input table replaced by a continuous generator, token id ->
    base-b digits -> per-digit codebooks -> B-spline separable modes -> d_model; untied output head.

This file imports only mlx and mlx_lm on purpose: it is copied verbatim into every saved model
directory as `appleslm_arch.py`, so stock mlx-lm can load our checkpoints with
`trust_remote_code=True` on a machine where appleslm is not installed. (No `from __future__ import
annotations` here: mlx-lm loads the file as an unregistered module, where dataclasses need real
annotations.)
"""

import math
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

EMBEDDINGS = ("table", "leviathan")
# Optional faster kernels, by name ("attention", "swiglu"). appleslm fills this with its CPU
# training kernels (appleslm/models/kernels.py); a kernel returns None to decline a call. Loaded
# by stock mlx-lm without appleslm, the table stays empty and the plain ops below run.
KERNELS: dict = {}


def attention(q: mx.array, k: mx.array, v: mx.array, cache: Any, scale: float, mask: Any):
    kernel = KERNELS.get("attention")
    out = kernel(q, k, v, cache=cache, scale=scale, mask=mask) if kernel else None
    if out is None:
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    return out


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    kernel = KERNELS.get("swiglu")
    out = kernel(gate, up) if kernel else None
    return nn.silu(gate) * up if out is None else out


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "appleslm"
    vocab_size: int = 32000
    hidden_size: int = 576
    num_hidden_layers: int = 30  # unique blocks
    layer_repeat: int = 1  # consecutive executions of each block (MobileLLM-LS uses 2)
    num_attention_heads: int = 9
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    embedding: str = "table"  # "table" or "leviathan"
    generator_d_seed: int = 128
    generator_digits: int = 3  # k: ids are written with k digits in base ceil(V ** (1/k))
    generator_heads: int = 8
    generator_knots: int = 16
    generator_rank: int = 8
    init_std: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; choose another head count or set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads {self.num_key_value_heads} must divide "
                f"num_attention_heads {self.num_attention_heads} (grouped-query attention)"
            )
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.embedding == "leviathan" and self.tie_word_embeddings:
            raise ValueError(
                "the Leviathan generator replaces only the input table and its output head is a "
                "full untied matrix: set tie_word_embeddings to false"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "layer_repeat",
            "intermediate_size",
            "generator_d_seed",
            "generator_digits",
            "generator_heads",
            "generator_rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.generator_knots < 2:
            raise ValueError(f"generator_knots must be at least 2, got {self.generator_knots}")


def digit_base(vocab_size: int, digits: int) -> int:
    """The smallest base b with b ** digits >= vocab_size (ceil(V ** (1/k)) without float error)."""
    base = max(2, math.ceil(vocab_size ** (1 / digits)) - 1)
    while base**digits < vocab_size:
        base += 1
    return base


def quadratic_bspline(t: mx.array) -> mx.array:
    """The centred quadratic B-spline kernel: support |t| < 1.5, peak 0.75 at 0."""
    a = mx.abs(t)
    return mx.where(a < 0.5, 0.75 - a * a, mx.where(a < 1.5, 0.5 * (1.5 - a) ** 2, 0.0))


class LeviathanGenerator(nn.Module):
    """Token ids -> d_model vectors computed from the id's digits, with no V x D table.

    All internals run in float32: the 128-way product of spline values is what makes the
    generator expressive, and it is the first thing low precision breaks.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, h = args.generator_d_seed, args.generator_heads
        knots, rank, std = args.generator_knots, args.generator_rank, args.init_std
        digits = args.generator_digits
        self.base = digit_base(args.vocab_size, digits)
        self.heads, self.d_seed, self.rank = h, d, rank
        # One codebook per digit position, stacked: digit r of an id selects row r * base + digit.
        self.codebooks = std * mx.random.normal((digits * self.base, d))
        self.seed_proj = nn.Linear(d, h * d, bias=False)
        self.seed_proj.weight = std * mx.random.normal((h * d, d))
        self.norm_weight = mx.ones((h, d))
        self.norm_bias = mx.zeros((h, d))
        # Multiplicative spline coefficients start near 1 so each mode starts near a product of 1s.
        self.spline = 1.0 + 0.1 * mx.random.normal((h, d, knots, rank))
        self.out_proj = nn.Linear(h * rank, args.hidden_size, bias=False)
        self.out_proj.weight = (std / math.sqrt(h)) * mx.random.normal((args.hidden_size, h * rank))
        self._place = mx.array([self.base**p for p in range(digits - 1, -1, -1)])
        self._row_offset = mx.arange(digits) * self.base
        self._knots = mx.arange(knots, dtype=mx.float32) / (knots - 1)

    def __call__(self, ids: mx.array) -> mx.array:
        shape = ids.shape
        ids = ids.reshape(-1, 1)
        digits = (ids // self._place) % self.base
        z = self.codebooks[digits + self._row_offset].astype(mx.float32).sum(axis=1)
        u = (z @ self.seed_proj.weight.astype(mx.float32).T).reshape(-1, self.heads, self.d_seed)
        u = mx.fast.layer_norm(u, None, None, 1e-5) * self.norm_weight + self.norm_bias
        x = mx.sigmoid(u / 2)
        basis = quadratic_bspline((x[..., None] - self._knots) * (self._knots.size - 1))
        basis = basis / basis.sum(axis=-1, keepdims=True)  # partition of unity at the edges too
        # (h, d, N, knots) @ (h, d, knots, rank): one small matmul per (head, seed dim).
        phi = basis.transpose(1, 2, 0, 3) @ self.spline.astype(mx.float32)
        # Rank-r separable modes: products over the seed dims, in log space, the sign kept apart.
        negatives = (phi < 0).sum(axis=1)
        sign = 1 - 2 * (negatives % 2)
        modes = sign * mx.exp(mx.log(mx.abs(phi) + 1e-9).sum(axis=1))  # (h, N, rank)
        modes = modes.transpose(1, 0, 2).reshape(-1, self.heads * self.rank)
        out = modes @ self.out_proj.weight.astype(mx.float32).T
        return out.astype(self.out_proj.weight.dtype).reshape(*shape, -1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, cache, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        if args.embedding == "table":
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        else:
            self.embed_generator = LeviathanGenerator(args)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self._init_body(args.init_std)

    def _init_body(self, std: float) -> None:
        """Normal(0, std) matrices as in Llama/MobileLLM (the generator initialises itself)."""
        modules = [
            *self.layers,
            getattr(self, "embed_tokens", None),
            getattr(self, "lm_head", None),
        ]
        for module in filter(None, modules):
            for _, sub in module.named_modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    sub.weight = std * mx.random.normal(sub.weight.shape)

    def executed_layers(self) -> list[TransformerBlock]:
        """Blocks in execution order: each unique block `layer_repeat` times in a row."""
        return [layer for layer in self.layers for _ in range(self.args.layer_repeat)]

    def embed(self, inputs: mx.array) -> mx.array:
        if self.args.embedding == "table":
            return self.embed_tokens(inputs)
        return self.embed_generator(inputs)

    def embed_unique(self, unique_ids: mx.array, inverse: mx.array) -> mx.array:
        """Input vectors for a batch whose distinct ids are `unique_ids` (`inverse` maps back).

        Training uses this so the generator runs once per distinct id of the batch, never on the
        whole vocabulary and never twice for a repeated token.
        """
        return self.embed(unique_ids)[inverse]

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: Any = None):
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        layers = self.executed_layers()
        cache = cache if cache is not None else [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(layers, cache):
            h = layer(h, mask, layer_cache)
        h = self.norm(h)
        if self.args.tie_word_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list[KVCache]:
        # One cache per *execution*: a shared block sees different inputs on each pass.
        return [KVCache() for _ in self.executed_layers()]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}

    @property
    def quant_predicate(self):
        def predicate(path: str, module: nn.Module) -> bool:
            # The generator is tiny and its products amplify rounding error: keep it float.
            return not path.startswith("embed_generator")

        return predicate

    def materialize(self, chunk: int = 4096) -> "Model":
        """The same network with the generator evaluated once into an ordinary embedding table."""
        if self.args.embedding == "table":
            return self
        table = mx.concatenate(
            [
                self.embed_generator(mx.arange(start, min(start + chunk, self.args.vocab_size)))
                for start in range(0, self.args.vocab_size, chunk)
            ]
        )
        model = Model(replace(self.args, embedding="table"))
        weights = {
            k: v for k, v in tree_flatten(self.parameters()) if not k.startswith("embed_generator.")
        }
        weights["embed_tokens.weight"] = table
        model.load_weights(list(weights.items()))
        return model
