"""Training step time of each architecture option against the dense model of the same body.

  python scripts/bench_arch.py              # the `tiny` body (6 x 128, vocab 2048), batch 8 x 128
  python scripts/bench_arch.py --body 10m   # 14 x 256, vocab 8192
  python scripts/bench_arch.py --reps 7 --only moe-iso-active

Each option runs one compiled AdamW step (with its auxiliary losses and, for a computed input
embedder, the embedder on the batch's distinct ids only, as the trainer does) interleaved with its
baseline, alternating which goes first, on the same batch of bundled-corpus tokens; the ratio is
the median of the paired ratios, because this machine drifts by 20-30% between runs.
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appleslm.blas import blas_in_use, reexec_with_openblas  # noqa: E402

reexec_with_openblas([sys.executable, *sys.argv])

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench_train import SHAPES, compiled_step  # noqa: E402

from appleslm.data.corpus import BUNDLED_CORPUS  # noqa: E402
from appleslm.data.tokenizer import train_tokenizer  # noqa: E402
from appleslm.models import ModelArgs, build_model, parameter_counts, token_losses  # noqa: E402

BODIES = {
    "tiny": dict(  # the `tiny` preset
        vocab_size=2048,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=320,
    ),
    "10m": SHAPES["10m"],  # the ~10M deep-thin shape of scripts/bench_train.py
}
BYTES = dict(  # the `tiny-bytes` preset's byte widths
    byte_embedding_dim=64,
    byte_encoder_widths=[128],
    byte_encoder_ffn=[256, 512],
    byte_encoder_heads=4,
    byte_head_width=64,
    byte_head_layers=2,
    byte_head_ffn=256,
    byte_head_heads=4,
)
TIED, UNTIED = dict(tie_word_embeddings=True), dict(tie_word_embeddings=False)
# option: (its overrides, the baseline's overrides)
OPTIONS = {
    "share-ffn": (dict(share_ffn=True), TIED),
    # Experts half the dense width, two per token: the dense model's FFN compute per token.
    "moe-iso-active": (dict(num_experts=4, num_experts_per_tok=2, intermediate_size=0.5), TIED),
    "moe-8x-full-width": (dict(num_experts=8, num_experts_per_tok=2), TIED),
    "bytes-embedder": (dict(BYTES, embedding="bytes", **UNTIED), UNTIED),
    "bytes-head-clean": (dict(BYTES, head="bytes", **UNTIED), UNTIED),
    "bytes-head-faithful": (dict(BYTES, head="bytes", byte_head_loss="faithful", **UNTIED), UNTIED),
    "bytes-both": (dict(BYTES, embedding="bytes", head="bytes", **UNTIED), UNTIED),
}
DISTINCT_BUCKET = 64  # pad a batch's distinct ids to a multiple of this, as the trainer does


def corpus_tokens(vocab_size: int, docs: int = 60) -> tuple[object, np.ndarray]:
    with lzma.open(BUNDLED_CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(docs), f)]
    tokenizer = train_tokenizer(texts, vocab_size)
    return tokenizer, np.array(tokenizer.encode("\n".join(texts)).ids)


def step_inputs(model, x: np.ndarray, y: np.ndarray) -> tuple[mx.array, ...]:
    if model.args.embedding == "table":
        return mx.array(x), mx.array(y)
    unique, inverse = np.unique(x, return_inverse=True)
    unique = np.concatenate([unique, np.full((-len(unique)) % DISTINCT_BUCKET, unique[0])])
    return mx.array(x), mx.array(y), mx.array(unique), mx.array(inverse.reshape(x.shape))


def loss(model, x, y, unique=None, inverse=None):
    embeddings = None if unique is None else model.embed_unique(unique, inverse)
    h, aux = model.features(x, embeddings)
    value = token_losses(model, h, y).mean()
    if aux:
        args = model.args
        value = value + args.router_aux_loss_coef * aux["router_balance"]
        value = value + args.router_z_loss_coef * aux["router_z"]
    return value


def timed(step, batch):
    def run() -> float:
        start = time.perf_counter()
        step(*batch)
        return time.perf_counter() - start

    return run


def paired(option, baseline, reps: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median seconds of option and baseline, and the median of per-pair ratios option/baseline;
    the two alternate which runs first."""
    for _ in range(warmup):
        option(), baseline()
    t_option, t_base = [], []
    for rep in range(reps):
        if rep % 2:
            t_base.append(baseline())
            t_option.append(option())
        else:
            t_option.append(option())
            t_base.append(baseline())
    ratios = [a / b for a, b in zip(t_option, t_base)]
    return statistics.median(t_option), statistics.median(t_base), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body", choices=sorted(BODIES), default="tiny")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--only", choices=sorted(OPTIONS), action="append")
    args = parser.parse_args()
    body = BODIES[args.body]
    tokenizer, ids = corpus_tokens(body["vocab_size"])
    n = args.batch * (args.seq_len + 1)
    window = ids[:n].reshape(args.batch, args.seq_len + 1)
    x, y = window[:, :-1], window[:, 1:]
    print(
        f"BLAS: {blas_in_use()}; float32, compiled; batch {args.batch} x {args.seq_len} of "
        f"bundled-corpus tokens ({len(np.unique(x))} distinct ids); {args.reps} pairs each"
    )
    print("| option | params (active) | baseline | step ms | baseline ms | step time ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.only or OPTIONS:
        overrides, base_overrides = OPTIONS[name]
        sides = []
        for side in (overrides, base_overrides):
            side = {**body, **side}
            if isinstance(side["intermediate_size"], float):  # a fraction of the body's width
                side["intermediate_size"] = int(
                    side["intermediate_size"] * body["intermediate_size"]
                )
            mx.random.seed(0)
            model = build_model(ModelArgs(**side), tokenizer, log=lambda line: None)
            sides.append((model, timed(compiled_step(model, loss), step_inputs(model, x, y))))
        (model, option), (base_model, baseline) = sides
        t_option, t_base, ratio = paired(option, baseline, args.reps)
        counts = parameter_counts(model)
        params = f"{counts['params_total'] / 1e6:.2f}M ({counts['params_active'] / 1e6:.2f}M)"
        base = "tied" if base_model.args.tie_word_embeddings else "untied"
        base += f" {parameter_counts(base_model)['params_total'] / 1e6:.2f}M"
        print(
            f"| {name} | {params} | {base} | {t_option * 1e3:.0f} | {t_base * 1e3:.0f} | "
            f"**{ratio:.2f}x** |",
            flush=True,
        )


if __name__ == "__main__":
    main()
