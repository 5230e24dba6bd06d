"""Faster training kernels for MLX's CPU backend, built from MLX ops only (no C++ extension).

Why. MLX has SIMD kernels for Apple silicon only. On Linux its CPU backend evaluates `exp`
(and so `sigmoid`, `softmax`, `logsumexp`) one element at a time, as a Cephes polynomial whose
seven `std::fma` calls are out-of-line libm calls in a wheel built for baseline x86-64: about
50M elements/s, 15-20x slower than numpy. Plain arithmetic, integer casts and constant shifts do
not have that problem: `mx.compile` fuses them into one C++ loop that g++ vectorizes and that runs
at memory speed. So here exp is written from those ops: 2^t = 2^n * 2^f with n the nearest
integer (magic-number rounding and a cast), 2^f a degree-6 polynomial on [-1/2, 1/2] (relative
error 1.7e-7 in float32, as accurate as `mx.exp`), and 2^n built in the float's exponent bits (a
shift and a bit-cast); sigmoid is 1 / (1 + exp(-x)).

Each kernel is a custom VJP that reuses what the forward computed (the softmax probabilities, the
SiLU's sigmoid) instead of differentiating through the polynomial or recomputing exponentials.
Values and gradients equal the plain MLX ops to ~1e-6 (tests/models/test_kernels.py).

When. Only on the CPU device and not on macOS (`enabled()`): on a Mac MLX has Metal kernels on
the GPU and NEON/Accelerate ones on the CPU, and nothing here would be faster. The architecture
file reaches these kernels through its `KERNELS` table, which `appleslm.models` fills, so a model
directory loaded by stock mlx-lm (no appleslm installed) runs the plain ops with the same values.
"""

from __future__ import annotations

import contextlib
import os
import sys

import mlx.core as mx

SWITCH = "APPLESLM_CPU_KERNELS"  # "0" turns them off, "1" forces them on (any device)

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2^23: (t + _ROUND) - _ROUND is t rounded to an integer (|t| < 2^22)
# 2^f on [-1/2, 1/2], a least-squares fit in relative error on Chebyshev nodes: 1.9e-9 in exact
# arithmetic, 1.7e-7 evaluated in float32 (Estrin's scheme below).
_C = (
    1.0000000005921685,
    0.6931472056058892,
    0.2402264660804228,
    0.0555032898574819,
    0.009618519562717198,
    0.0013399865142318284,
    0.00015337580957013302,
)
MASKED = -1e9  # masked attention scores: finite, as `exp` needs; their exp is 0

_forced: bool | None = None


def enabled() -> bool:
    """Whether the CPU kernels should replace the plain ops for arrays on the default device."""
    if _forced is not None:
        return _forced
    choice = os.environ.get(SWITCH, "auto")
    if choice in ("0", "1"):
        return choice == "1"
    return sys.platform != "darwin" and mx.default_device() == mx.cpu


@contextlib.contextmanager
def forced(on: bool | None):
    """Turn the kernels on or off inside the block (benchmarks and tests compare both).

    The choice is made when a function is traced: trace (first-call) a compiled step inside the
    block to give it the kernels, or not.
    """
    global _forced
    previous, _forced = _forced, on
    try:
        yield
    finally:
        _forced = previous


def boundary(x: mx.array) -> mx.array:
    """x, materialized: a fusion boundary inside `mx.compile`, free for a contiguous array.

    (`mx.stop_gradient` is no boundary: compile drops it as a no-op.) Kernels built from many
    small ops need boundaries: MLX stops fusing 11 ops deep or at 24 inputs (its scalar constants
    count), and a kernel that reads a broadcast input is compiled as a strided loop that g++
    does not vectorize.
    """
    return mx.contiguous(x)


def exp(x: mx.array) -> mx.array:
    """exp(x) for float32 |x| < 1.4e9 from ops MLX's CPU compiler fuses and vectorizes.

    2^(x log2 e) = 2^n 2^f, n the nearest integer (clamped to [-127, 128]: 2^n is then 0 or inf,
    exactly as exp under- and overflows), f in [-1/2, 1/2]. 2^n goes through a bit-cast, which MLX
    cannot fuse: its kernel and the polynomial's each compute n from x (cheap arithmetic) rather
    than share it, which would cost a memory pass (`x + 0.0`, exactly x, keeps MLX from merging
    the two copies). Past |x| = 1.4e9 (x log2 e outside int32) the result is undefined, which a
    training run never reaches before its loss has diverged; NaN gives NaN.
    """
    t = (x + 0.0) * _LOG2E
    n = ((t + _ROUND) - _ROUND).astype(mx.int32)
    n = mx.minimum(mx.maximum(n, -127), 128)
    two_n = mx.view(mx.left_shift(n + 127, 23), mx.float32)  # bits 0 (value 0) .. 255 << 23 (inf)
    t = x * _LOG2E
    f = t - ((t + _ROUND) - _ROUND)
    c0, c1, c2, c3, c4, c5, c6 = _C
    f2 = f * f
    p = (c0 + c1 * f) + f2 * (c2 + c3 * f) + (f2 * f2) * ((c4 + c5 * f) + c6 * f2)
    return p * two_n


def _sigmoid(x: mx.array) -> mx.array:
    # exp's result is materialized (a fusion boundary): fused into what follows, its chain would
    # pass MLX's fusion limits and be split into several kernels, each a memory pass. For
    # x < -88, exp(-x) is inf and the quotient 0, as it should be.
    return 1.0 / (1.0 + boundary(exp(-x)))


# ---------------------------------------------------------------- softmax over the last axis


@mx.compile
def _softmax_forward(z: mx.array) -> mx.array:
    # The shifted scores are materialized (a fusion boundary) so that exp's long chain runs in a
    # contiguous, vectorized kernel: fused with the broadcast row maximum it would be a strided
    # kernel, which g++ leaves scalar (4x slower here).
    e = exp(boundary(z - z.max(axis=-1, keepdims=True)))
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


@mx.compile
def _softmax_backward(p: mx.array, g: mx.array) -> mx.array:
    return p * (g - (g * p).sum(axis=-1, keepdims=True))


@mx.custom_function
def _softmax(z: mx.array) -> mx.array:
    return _softmax_forward(z)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (_softmax_backward(output, cotangent),)


def softmax(z: mx.array) -> mx.array:
    """Softmax over the last axis of finite float32 scores; the VJP reuses the probabilities."""
    return _softmax(z)


_MASKS: dict[tuple[int, int], mx.array] = {}


def _future_mask(rows: int, length: int) -> mx.array:
    """MASKED where key position > query position (row r is query r % length), else 0.

    Built once per shape and evaluated: inside a compiled step it is a constant, not a kernel
    (MLX's compiled comparisons and remainders do not vectorize).
    """
    if (rows, length) not in _MASKS:
        position = mx.arange(rows)[:, None] % length
        mask = (mx.arange(length)[None] > position).astype(mx.float32) * MASKED
        mx.eval(mask)
        _MASKS[rows, length] = mask
    return _MASKS[rows, length]


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal grouped-query attention, (B, H, L, D) queries over (B, H_kv, L, D) keys/values.

    The same computation as `mx.fast.scaled_dot_product_attention(..., mask="causal")`'s CPU
    path (scaled queries, scores in float32, softmax, weighted values) with the softmax above.
    """
    B, H, L, D = q.shape
    groups = k.shape[1]
    rows = (H // groups) * L  # the query heads sharing a key head, stacked along the rows
    scores = ((q * scale).reshape(B, groups, rows, D) @ k.swapaxes(-1, -2)).astype(mx.float32)
    p = softmax(scores + _future_mask(rows, L))
    return (p.astype(v.dtype) @ v).reshape(B, H, L, D)


# ---------------------------------------------------------------- SwiGLU: silu(gate) * up


@mx.compile
def _swiglu_forward(gate: mx.array, up: mx.array) -> tuple[mx.array, mx.array]:
    g = gate.astype(mx.float32)
    s = _sigmoid(g)
    return (g * s * up.astype(mx.float32)).astype(gate.dtype), s


@mx.compile
def _swiglu_backward(gate, up, s, cotangent):
    g, u, c = gate.astype(mx.float32), up.astype(mx.float32), cotangent.astype(mx.float32)
    silu = g * s
    d_gate = c * u * (s + silu * (1.0 - s))  # d silu / dg = s (1 + g (1 - s))
    return d_gate.astype(gate.dtype), (c * silu).astype(up.dtype)


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array):
    return _swiglu_forward(gate, up)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangents, outputs):
    gate, up = primals
    return _swiglu_backward(gate, up, outputs[1], cotangents[0])


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """`nn.silu(gate) * up`; the VJP reuses the forward's sigmoid."""
    return _swiglu(gate, up)[0]


# ---------------------------------------------------------------- the architecture's hooks


def attention_kernel(q, k, v, *, cache, scale, mask):
    """`KERNELS["attention"]`: causal training attention (no cache), else None (the plain op)."""
    if (
        not enabled()
        or cache is not None
        or not (isinstance(mask, str) and mask == "causal")
        or q.shape[2] != k.shape[2]
    ):
        return None
    return causal_attention(q, k, v, scale)


SMALL_ROWS = 16  # fewer tokens than this (decoding): the plain ops, whose dispatch is cheaper


def swiglu_kernel(gate, up):
    """`KERNELS["swiglu"]`: the SwiGLU above on the CPU, else None (the plain ops).

    Decoding one token it would cost 3% of the step (its custom VJP and compiled calls'
    dispatch); from 16 tokens on it is several times faster.
    """
    if not enabled() or gate.size < SMALL_ROWS * gate.shape[-1]:
        return None
    return swiglu(gate, up)


def install(kernels: dict) -> None:
    """Fill an architecture module's `KERNELS` table with these kernels."""
    kernels.update(attention=attention_kernel, swiglu=swiglu_kernel)
