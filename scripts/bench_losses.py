"""The fused, chunked head + cross-entropy against the plain logits path: memory, time, gradients.

  python scripts/bench_losses.py                    # V 49152 (SmolLM2), d 128, 2048 tokens
  python scripts/bench_losses.py --vocab 2048 --masked

One compiled forward + backward (gradients of the loss sum with respect to the hidden states and
the head matrix) of `nn.losses.cross_entropy(h @ W.T, targets)` against
`appleslm.train.losses.token_loss_sums(h, W, targets)`, alternating in one process; peak memory
is MLX's peak over one call (`mx.get_peak_memory` after a reset), minus the inputs. Targets:
peak <= 0.5x, time <= 1.0x, gradients equal to 1e-5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appleslm.blas import blas_in_use, reexec_with_openblas  # noqa: E402

reexec_with_openblas([sys.executable, *sys.argv])

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from appleslm.train.losses import default_chunk, token_loss_sums  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--masked", action="store_true", help="an SFT-style 0/1 mask")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)

    mx.random.seed(0)
    h = (mx.random.normal((args.tokens, args.dim)) * 0.5).astype(dtype)
    weight = (mx.random.normal((args.vocab, args.dim)) * 0.1).astype(dtype)
    targets = mx.random.randint(0, args.vocab, (args.tokens,))
    mask = (
        (mx.random.uniform(shape=(args.tokens,)) > 0.4).astype(mx.float32) if args.masked else None
    )
    mx.eval(h, weight, targets, mask if mask is not None else targets)
    chunk = args.chunk or default_chunk(args.vocab)

    def plain(h, weight):
        logits = (h @ weight.T).astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")
        return (losses if mask is None else losses * mask).sum()

    def fused(h, weight):
        return token_loss_sums(h, weight, targets, mask, chunk=chunk)[0]

    steps = {
        "plain": mx.compile(mx.value_and_grad(plain, argnums=(0, 1))),
        "fused": mx.compile(mx.value_and_grad(fused, argnums=(0, 1))),
    }
    outputs = {name: step(h, weight) for name, step in steps.items()}
    mx.eval(outputs)
    (value_p, grads_p), (value_f, grads_f) = outputs["plain"], outputs["fused"]
    scale = max(1.0, abs(value_p.item()))
    errors = [abs(value_f.item() - value_p.item()) / scale]
    for a, b in zip(grads_f, grads_p):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        errors.append((mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1.0)).item())
    del outputs, grads_p, grads_f

    base = mx.get_active_memory()
    peaks, times = {n: [] for n in steps}, {n: [] for n in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            mx.clear_cache()
            mx.reset_peak_memory()
            start = time.perf_counter()
            mx.eval(step(h, weight))
            times[name].append(time.perf_counter() - start)
            peaks[name].append(mx.get_peak_memory() - base)
    load = os.getloadavg()[0]
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"BLAS: {blas_in_use()}; load {load:.2f}")
    print(
        f"V {args.vocab}, d {args.dim}, {args.tokens} tokens, {args.dtype}"
        f"{', masked' if args.masked else ''}; chunk {chunk} tokens; full float32 logits "
        f"{logits_mib:.0f} MiB; {args.reps} pairs"
    )
    for name in steps:
        print(
            f"  {name:5s} peak {statistics.median(peaks[name]) / 2**20:7.0f} MiB, "
            f"forward + backward {statistics.median(times[name]) * 1e3:7.0f} ms"
        )
    mem = statistics.median(f / p for f, p in zip(peaks["fused"], peaks["plain"]))
    speed = statistics.median(f / p for f, p in zip(times["fused"], times["plain"]))
    print(f"  fused / plain: peak memory {mem:.3f}x (target <= 0.5), time {speed:.3f}x (<= 1.0)")
    print(
        "  max relative difference (loss, d h, d W): "
        + ", ".join(f"{e:.1e}" for e in errors)
        + " (target <= 1e-5)"
    )


if __name__ == "__main__":
    main()
