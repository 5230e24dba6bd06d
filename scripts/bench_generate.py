"""Generation speed: float vs 8-bit vs 4-bit, and our generate path vs mlx-lm's, side by side.

  python scripts/bench_generate.py                 # a random ~10M appleslm model (vocab 8192)
  python scripts/bench_generate.py runs/tiny/model # any model directory

For each precision the same prompt (128 tokens) is decoded greedily for 128 tokens by
`appleslm.generate.stream_tokens` (what `appleslm generate` and the chat app use) and by plain
`mlx_lm.stream_generate`, interleaved; figures are medians over paired runs, read from mlx-lm's own
GenerationResponse (prompt and generation tokens/s). Target: ours >= 1.0x mlx-lm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appleslm.blas import blas_in_use, reexec_with_openblas  # noqa: E402

reexec_with_openblas([sys.executable, *sys.argv])

import mlx.core as mx  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402
from mlx_lm.utils import quantize_model  # noqa: E402

from appleslm.generate import SamplingSettings, stream_tokens  # noqa: E402
from appleslm.io.model_dir import load_model, save_model_dir  # noqa: E402
from appleslm.models import Model, ModelArgs  # noqa: E402

TEN_M = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=14,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=704,
    max_position_embeddings=1024,
)


def random_model_dir(root: Path) -> Path:
    """A random-weight ~10M model carrying a real BPE tokenizer trained on the bundled corpus."""
    from appleslm.config import DataConfig
    from appleslm.data import prepare_data
    from appleslm.data.tokenizer import save_tokenizer

    data = prepare_data(DataConfig(), vocab_size=TEN_M["vocab_size"])
    save_tokenizer(data.tokenizer, root / "tokenizer")
    mx.random.seed(0)
    model = Model(ModelArgs(**TEN_M))
    return save_model_dir(root / "model", model, tokenizer_dir=root / "tokenizer")


def last(responses):
    return deque(responses, maxlen=1)[0]


def measure(model, tokenizer, prompt: list[int], tokens: int, reps: int) -> dict[str, float]:
    greedy = SamplingSettings(temperature=0.0, max_tokens=tokens)
    ours = lambda: last(stream_tokens(model, tokenizer, prompt, greedy))  # noqa: E731
    theirs = lambda: last(stream_generate(model, tokenizer, prompt, max_tokens=tokens))  # noqa: E731
    ours(), theirs()
    rows = []
    for _ in range(reps):
        a, b = ours(), theirs()
        rows.append((a.prompt_tps, a.generation_tps, b.prompt_tps, b.generation_tps))
    med = [statistics.median(col) for col in zip(*rows)]
    return {
        "prompt": med[0],
        "decode": med[1],
        "mlx_prompt": med[2],
        "mlx_decode": med[3],
        "decode_ratio": statistics.median(r[1] / r[3] for r in rows),
        "prompt_ratio": statistics.median(r[0] / r[2] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (default: random ~10M)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else random_model_dir(Path(tmp))
        print(
            f"BLAS: {blas_in_use()}; model {model_dir}; prompt 128 tokens, "
            f"{args.tokens} generated, greedy, median of {args.reps} paired runs"
        )
        print(
            f"{'':8s} {'prompt tok/s':>13s} {'decode tok/s':>13s} {'mlx-lm decode':>14s} "
            f"{'ours/mlx-lm decode':>19s} {'prompt':>7s}"
        )
        for bits in (None, 8, 4):
            model, tokenizer = load_model(model_dir)
            if bits is not None:
                config = {"model_type": getattr(model, "model_type", "")}
                model, _ = quantize_model(model, config, 64, bits)
            prompt = list(range(10, 138))
            m = measure(model, tokenizer, prompt, args.tokens, args.reps)
            name = "float" if bits is None else f"{bits}-bit"
            print(
                f"{name:8s} {m['prompt']:13.1f} {m['decode']:13.1f} {m['mlx_decode']:14.1f} "
                f"{m['decode_ratio']:18.3f}x {m['prompt_ratio']:6.3f}x"
            )


if __name__ == "__main__":
    main()
