"""The appleslm decoder family, on mlx-lm's model skeleton.

One Llama-style body (pre-RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases) with the knobs
the small-model papers turn:
  - MobileLLM: deep-and-thin shapes, tied input/output embedding, and immediate block-wise weight
    sharing (`layer_repeat`: each unique block runs that many times in a row, 1,1,2,2,...).
  - Leviathan (Batley & Saha, 2026): the input table replaced by a continuous generator, token id ->
    base-b digits -> per-digit codebooks -> B-spline separable modes -> d_model; untied output head.
  - Super Tiny Language Models (Hillier et al., 2024): a byte-level input embedder (each id's
    UTF-8 bytes -> a small bidirectional byte transformer -> mean pool), a byte-level output head
    (all bytes of the next token predicted in parallel, exposed as logits over the token
    vocabulary), and one FFN shared by every block (`share_ffn`, as MobiLlama).
  - Mixtral (Jiang et al., 2024): a sparse mixture-of-experts FFN, a linear router choosing the
    top-k of `num_experts` SwiGLU experts per token (mlx-lm's SwitchGLU), with the Switch/Mixtral
    load-balancing and ST-MoE router z-loss terms returned by `Model.features` for the trainer.

Ids stay ids everywhere: the byte options read a token's bytes from `token_bytes`, a frozen
(V, byte_slots) table built from the tokenizer and saved with the weights, so mlx-lm's generation,
caches, LoRA, quantization and speculative decoding work unchanged.

This file imports only mlx and mlx_lm on purpose: it is copied verbatim into every saved model
directory as `appleslm_arch.py`, so stock mlx-lm can load our checkpoints with
`trust_remote_code=True` on a machine where appleslm is not installed. (No `from __future__ import
annotations` here: mlx-lm loads the file as an unregistered module, where dataclasses need real
annotations.)
"""

import math
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

EMBEDDINGS = ("table", "leviathan", "bytes")
HEADS = ("linear", "bytes")
BYTE_MODES = ("clean", "faithful")
BYTE_PAD = 256  # byte symbols: the 256 byte values, then the pad that fills a token's spare slots
BYTE_SYMBOLS = 257
BYTE_NORM_EPS = 1e-6  # STLM's RMSNorm epsilon in the byte transformers
# Small modules every token passes through, where rounding error compounds: never quantized.
FLOAT_MODULES = ("embed_generator", "embed_bytes", "byte_head")
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
    embedding: str = "table"  # "table", "leviathan" or "bytes"
    head: str = "linear"  # "linear" (tied or untied table) or "bytes"
    share_ffn: bool = False  # one FFN for every block (STLM, MobiLlama)
    num_experts: int = 0  # 0: a dense SwiGLU FFN; >= 2: Mixtral's sparse MoE of that many experts
    num_experts_per_tok: int = 2  # top-k experts per token; intermediate_size is per expert
    router_aux_loss_coef: float = 0.01  # trainer's weight on features()["router_balance"]
    router_z_loss_coef: float = 0.0  # trainer's weight on features()["router_z"] (ST-MoE: 1e-3)
    generator_d_seed: int = 128
    generator_digits: int = 3  # k: ids are written with k digits in base ceil(V ** (1/k))
    generator_heads: int = 8
    generator_knots: int = 16
    generator_rank: int = 8
    byte_slots: int = 12  # bytes kept per token id, padded or cut (STLM: 12)
    byte_embedding_dim: int = 128  # width of the byte embedding entering the encoder
    # Output widths of the byte encoder's blocks but the last, which outputs hidden_size; and the
    # FFN width of every block. STLM at paper time: 128 -> 256 -> d with FFNs 512, 1024.
    byte_encoder_widths: list = field(default_factory=lambda: [256])
    byte_encoder_ffn: list = field(default_factory=lambda: [512, 1024])
    byte_encoder_heads: int = 8
    byte_embedding_mode: str = "clean"  # "clean": mean over real bytes; "faithful": pads included
    byte_head_width: int = 128
    byte_head_layers: int = 2
    byte_head_ffn: int = 512
    byte_head_heads: int = 8
    byte_head_loss: str = "clean"  # "clean": token-level CE; "faithful": STLM's per-slot CE
    init_std: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_positive()
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
        for name, allowed in (
            ("embedding", EMBEDDINGS),
            ("head", HEADS),
            ("byte_embedding_mode", BYTE_MODES),
            ("byte_head_loss", BYTE_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.tie_word_embeddings:
            self._check_tying()
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "layer_repeat",
            "intermediate_size",
            "num_experts_per_tok",
            "generator_d_seed",
            "generator_digits",
            "generator_heads",
            "generator_rank",
            "byte_slots",
            "byte_embedding_dim",
            "byte_encoder_heads",
            "byte_head_width",
            "byte_head_layers",
            "byte_head_ffn",
            "byte_head_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.generator_knots < 2:
            raise ValueError(f"generator_knots must be at least 2, got {self.generator_knots}")
        self._check_experts()
        self._check_byte_transformers()

    def _check_positive(self) -> None:
        """The sizes and scales every shape and the arithmetic below rely on."""
        for name in ("num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim must be at least 1, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be at least 0, got {value}")

    def _check_tying(self) -> None:
        if self.embedding == "leviathan":
            raise ValueError(
                "the Leviathan generator replaces only the input table and its output head is a "
                "full untied matrix: set tie_word_embeddings to false"
            )
        if self.embedding == "bytes" or self.head == "bytes":
            raise ValueError(
                f"embedding {self.embedding!r} with head {self.head!r} leaves no V x D table to "
                "share between input and output: set tie_word_embeddings to false"
            )

    def _check_experts(self) -> None:
        if self.num_experts == 1 or self.num_experts < 0:
            raise ValueError(
                f"num_experts must be 0 (a dense FFN) or at least 2, got {self.num_experts}"
            )
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be at most num_experts "
                f"{self.num_experts}"
            )

    def _check_byte_transformers(self) -> None:
        self.byte_encoder_widths = list(self.byte_encoder_widths)
        self.byte_encoder_ffn = list(self.byte_encoder_ffn)
        for name in ("byte_encoder_widths", "byte_encoder_ffn"):
            values = getattr(self, name)
            if not all(isinstance(v, int) and v >= 1 for v in values):
                raise ValueError(f"{name} must be a list of positive integers, got {values}")
        blocks = len(self.byte_encoder_widths) + 1
        if len(self.byte_encoder_ffn) != blocks:
            raise ValueError(
                f"byte_encoder_ffn needs one FFN width per byte encoder block: "
                f"byte_encoder_widths {self.byte_encoder_widths} makes {blocks} blocks (the last "
                f"one outputs hidden_size), got {len(self.byte_encoder_ffn)}"
            )
        inputs = [self.byte_embedding_dim, *self.byte_encoder_widths]
        if any(width % self.byte_encoder_heads for width in inputs):
            raise ValueError(
                f"byte_encoder_heads {self.byte_encoder_heads} must divide the input width of "
                f"every byte encoder block, {inputs}"
            )
        if self.byte_head_width % self.byte_head_heads:
            raise ValueError(
                f"byte_head_heads {self.byte_head_heads} must divide byte_head_width "
                f"{self.byte_head_width}"
            )


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

    def __call__(self, x: mx.array) -> tuple[mx.array, None]:
        # Every FFN returns (output, router logits), so MoE statistics need no side channel.
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x))), None


def top_k_experts(router_logits: mx.array, k: int) -> mx.array:
    """The k experts with the largest router logits, per token (no gradient: a choice)."""
    return mx.stop_gradient(mx.argpartition(-router_logits, kth=k - 1, axis=-1)[..., :k])


class SparseMoE(nn.Module):
    """Mixtral's sparse FFN: a linear router, the top-k experts per token, their outputs weighted
    by a softmax over the k selected logits. The experts are mlx-lm's SwitchGLU (one gather_mm
    per projection, not a loop over experts)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = SwitchGLU(args.hidden_size, args.intermediate_size, args.num_experts)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        router_logits = self.router(x)
        chosen = top_k_experts(router_logits, self.top_k)
        scores = mx.softmax(
            mx.take_along_axis(router_logits, chosen, axis=-1), axis=-1, precise=True
        )
        out = (self.experts(x, chosen) * scores[..., None]).sum(axis=-2)
        return out, router_logits


def feed_forward(args: ModelArgs) -> MLP | SparseMoE:
    return SparseMoE(args) if args.num_experts else MLP(args)


def expert_shares(router_logits: mx.array, k: int) -> mx.array:
    """Share of the (token, top-k slot) assignments that go to each expert: (E,), sums to 1."""
    chosen = top_k_experts(router_logits, k).reshape(-1, 1)
    return (chosen == mx.arange(router_logits.shape[-1])).astype(mx.float32).mean(axis=0)


def router_losses(router_logits: list[mx.array], k: int) -> dict[str, mx.array]:
    """Raw auxiliary terms, averaged over MoE executions (the trainer applies the coefficients).

    router_balance: Switch/Mixtral load balancing, E * sum_i f_i * P_i, with f_i the share of
      assignments to expert i and P_i its mean probability under the *full* softmax (a softmax
      over the top-k only would hide the unchosen experts from the gradient). 1.0 when balanced;
      HF Mixtral's f_i sums to k instead of 1, so its value is k times this one.
    router_z: ST-MoE's mean squared logsumexp of the router logits, which keeps them small.
    """
    if not router_logits:
        return {}
    balance, z = [], []
    for logits in router_logits:
        logits = logits.astype(mx.float32).reshape(-1, logits.shape[-1])
        probs = mx.softmax(logits, axis=-1).mean(axis=0)
        balance.append(logits.shape[-1] * (expert_shares(logits, k) * probs).sum())
        z.append(mx.square(mx.logsumexp(logits, axis=-1)).mean())
    return {"router_balance": mx.stack(balance).mean(), "router_z": mx.stack(z).mean()}


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, own_ffn: bool = True):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if own_ffn:
            self.mlp = feed_forward(args)

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, shared_ffn: Any = None
    ) -> tuple[mx.array, mx.array | None]:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        ffn = self.mlp if shared_ffn is None else shared_ffn
        out, router_logits = ffn(self.post_attention_layernorm(h))
        return h + out, router_logits


class ByteAttention(nn.Module):
    """Bidirectional multi-head attention over one token's byte slots (no mask, no RoPE: the
    slots carry learned positions), with STLM's fused q/k/v projection."""

    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(dims, 3 * dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        N, S, D = x.shape
        q, k, v = self.qkv_proj(x).reshape(N, S, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // self.heads) ** -0.5)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(N, S, D))


class ByteBlock(nn.Module):
    """STLM's byte-level block: x + attn(norm(x)), then an FFN that changes the width and so has
    no residual: ffn(norm(x)), Linear -> GELU -> Linear."""

    def __init__(self, dims: int, out_dims: int, ffn_dims: int, heads: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dims, eps=BYTE_NORM_EPS)
        self.attn = ByteAttention(dims, heads)
        self.ffn_norm = nn.RMSNorm(dims, eps=BYTE_NORM_EPS)
        self.ffn_in = nn.Linear(dims, ffn_dims, bias=False)
        self.ffn_out = nn.Linear(ffn_dims, out_dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.attn_norm(x))
        return self.ffn_out(nn.gelu(self.ffn_in(self.ffn_norm(x))))


class ByteTransformer(nn.Module):
    """Learned slot positions, then byte blocks: (N, slots, widths[0]) -> (N, slots, widths[-1])."""

    def __init__(self, args: ModelArgs, widths: list[int], ffn: list[int], heads: int):
        super().__init__()
        self.positions = args.init_std * mx.random.normal((args.byte_slots, widths[0]))
        self.blocks = [
            ByteBlock(dims, out_dims, ffn_dims, heads)
            for dims, out_dims, ffn_dims in zip(widths[:-1], widths[1:], ffn)
        ]

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.positions
        for block in self.blocks:
            x = block(x)
        return x


class ByteEmbedder(nn.Module):
    """STLM's byte-level input: a token's byte slots -> byte embeddings -> byte transformer ->
    mean over the slots -> d_model. `clean` averages the real bytes only; `faithful` averages all
    slots, pads included, as STLM's code does (a 1-byte token is then mostly pad)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.masked_mean = args.byte_embedding_mode == "clean"
        self.byte_embed = nn.Embedding(BYTE_SYMBOLS, args.byte_embedding_dim)
        widths = [args.byte_embedding_dim, *args.byte_encoder_widths, args.hidden_size]
        self.encoder = ByteTransformer(args, widths, args.byte_encoder_ffn, args.byte_encoder_heads)

    def __call__(self, byte_ids: mx.array) -> mx.array:
        shape, slots = byte_ids.shape[:-1], byte_ids.shape[-1]
        byte_ids = byte_ids.reshape(-1, slots)
        x = self.encoder(self.byte_embed(byte_ids))
        if self.masked_mean:
            real = (byte_ids != BYTE_PAD)[..., None].astype(x.dtype)
            x = (x * real).sum(axis=1) / mx.maximum(real.sum(axis=1), 1)
        else:
            x = x.mean(axis=1)
        return x.reshape(*shape, -1)


class ByteHead(nn.Module):
    """STLM's byte-level output: d_model -> slots x width -> byte transformer -> 257-way logits
    for every byte slot of the next token, all predicted in parallel."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.slots, self.width = args.byte_slots, args.byte_head_width
        self.proj = nn.Linear(args.hidden_size, self.slots * self.width, bias=False)
        widths = [self.width] * (args.byte_head_layers + 1)
        ffn = [args.byte_head_ffn] * args.byte_head_layers
        self.decoder = ByteTransformer(args, widths, ffn, args.byte_head_heads)
        self.out = nn.Linear(self.width, BYTE_SYMBOLS, bias=False)

    def __call__(self, h: mx.array) -> mx.array:
        x = self.decoder(self.proj(h).reshape(-1, self.slots, self.width))
        return self.out(x).reshape(*h.shape[:-1], self.slots, BYTE_SYMBOLS)


def byte_string_scores(byte_logits: mx.array, token_bytes: mx.array) -> mx.array:
    """(..., slots, 257) byte logits -> (..., V): each id's log-probability of its padded byte
    string, the sum over slots of log p(slot byte), pads included as a symbol."""
    log_probs = nn.log_softmax(byte_logits.astype(mx.float32), axis=-1)
    # Slot-major (slots, 257, positions), so each slot's lookup copies whole rows of positions:
    # 3x faster on MLX's CPU, forward and backward, than gathering along the last axis.
    by_slot = log_probs.reshape(-1, *log_probs.shape[-2:]).transpose(1, 2, 0)
    scores = by_slot[0][token_bytes[:, 0]]
    for slot in range(1, token_bytes.shape[1]):
        scores = scores + by_slot[slot][token_bytes[:, slot]]
    return scores.T.reshape(*byte_logits.shape[:-2], -1).astype(byte_logits.dtype)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        if args.embedding == "table":
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        elif args.embedding == "leviathan":
            self.embed_generator = LeviathanGenerator(args)
        else:
            self.embed_bytes = ByteEmbedder(args)
        self.layers = [
            TransformerBlock(args, own_ffn=not args.share_ffn)
            for _ in range(args.num_hidden_layers)
        ]
        if args.share_ffn:
            self.shared_mlp = feed_forward(args)
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.head == "bytes":
            self.byte_head = ByteHead(args)
        elif not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if "bytes" in (args.embedding, args.head):
            # Each id's UTF-8 bytes, filled from the tokenizer when the model is created (see
            # appleslm.models.build_model) and saved with the weights: data, never trained.
            self.token_bytes = mx.full((args.vocab_size, args.byte_slots), BYTE_PAD, mx.int32)
            self.freeze(recurse=False, keys=["token_bytes"])
        self._init_body(args.init_std)

    def _init_body(self, std: float) -> None:
        """Normal(0, std) matrices as in Llama/MobileLLM (the generator initialises itself)."""
        modules = [
            *self.layers,
            getattr(self, "shared_mlp", None),
            getattr(self, "embed_tokens", None),
            getattr(self, "embed_bytes", None),
            getattr(self, "lm_head", None),
            getattr(self, "byte_head", None),
        ]
        for module in filter(None, modules):
            for _, sub in module.named_modules():
                if isinstance(sub, (nn.Linear, nn.Embedding, SwitchLinear)):
                    sub.weight = std * mx.random.normal(sub.weight.shape)

    def unfreeze(self, **kwargs) -> "Model":
        # The byte table is data: whoever unfreezes the model to train it must not train it.
        super().unfreeze(**kwargs)
        if "token_bytes" in self:
            self.freeze(recurse=False, keys=["token_bytes"])
        return self

    def executed_layers(self) -> list[TransformerBlock]:
        """Blocks in execution order: each unique block `layer_repeat` times in a row."""
        return [layer for layer in self.layers for _ in range(self.args.layer_repeat)]

    def embed(self, inputs: mx.array) -> mx.array:
        if self.args.embedding == "table":
            return self.embed_tokens(inputs)
        if self.args.embedding == "leviathan":
            return self.embed_generator(inputs)
        return self.embed_bytes(self.token_bytes[inputs])

    def embed_unique(self, unique_ids: mx.array, inverse: mx.array) -> mx.array:
        """Input vectors for a batch whose distinct ids are `unique_ids` (`inverse` maps back).

        Training uses this so a computed embedder (generator, byte encoder) runs once per
        distinct id of the batch, never on the whole vocabulary and never twice for a repeat.
        """
        return self.embed(unique_ids)[inverse]

    def hidden_states(
        self, inputs: mx.array, cache: Any = None, input_embeddings: Any = None
    ) -> tuple[mx.array, list[mx.array]]:
        """The final-norm hidden states and the router logits of every MoE execution."""
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        layers = self.executed_layers()
        cache = cache if cache is not None else [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        shared_ffn = getattr(self, "shared_mlp", None)
        router_logits = []
        for layer, layer_cache in zip(layers, cache):
            h, logits = layer(h, mask, layer_cache, shared_ffn)
            if logits is not None:
                router_logits.append(logits)
        return self.norm(h), router_logits

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: Any = None):
        return self.head_logits(self.hidden_states(inputs, cache, input_embeddings)[0])

    def features(
        self, inputs: mx.array, input_embeddings: Any = None
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """For training: hidden states (B, L, D) and the raw auxiliary terms of `router_losses`
        (an empty dict for a dense model)."""
        h, router_logits = self.hidden_states(inputs, input_embeddings=input_embeddings)
        return h, router_losses(router_logits, self.args.num_experts_per_tok)

    def head_logits(self, h: mx.array) -> mx.array:
        """Logits over the token vocabulary, (B, L, V), from hidden states."""
        if self.args.head == "bytes":
            return byte_string_scores(self.byte_head(h), self.token_bytes)
        if self.args.tie_word_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def byte_logits(self, h: mx.array) -> mx.array:
        """The byte head's own output, (B, L, slots, 257), for STLM's per-slot loss."""
        return self.byte_head(h)

    def router_load(self, inputs: mx.array) -> mx.array:
        """(MoE executions, E): the share of token assignments each expert gets on `inputs`."""
        if not self.args.num_experts:
            raise ValueError("router_load needs a mixture-of-experts model (num_experts >= 2)")
        _, router_logits = self.hidden_states(inputs)
        k = self.args.num_experts_per_tok
        return mx.stack([expert_shares(logits, k) for logits in router_logits])

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
            # The computed embedders and the byte head are small and every token's vector goes
            # through them; the router is tiny and a rounding error can flip its top-k choice.
            return not (path.startswith(FLOAT_MODULES) or path.endswith("router"))

        return predicate

    def materialize(self, chunk: int = 4096) -> "Model":
        """The same network with a computed input embedder (generator or byte encoder)
        evaluated once into an ordinary embedding table."""
        if self.args.embedding == "table":
            return self
        table = mx.concatenate(
            [
                self.embed(mx.arange(start, min(start + chunk, self.args.vocab_size)))
                for start in range(0, self.args.vocab_size, chunk)
            ]
        )
        model = Model(replace(self.args, embedding="table"))
        ours = dict(tree_flatten(self.parameters()))
        weights = [(k, ours[k]) for k, _ in tree_flatten(model.parameters()) if k in ours]
        model.load_weights([*weights, ("embed_tokens.weight", table)])
        return model
