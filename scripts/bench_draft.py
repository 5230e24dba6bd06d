"""Speculative decoding with a draft distilled here: decode tokens/s with and without it.

  python scripts/bench_draft.py runs/models/smollm2 runs/draft/model
  python scripts/bench_draft.py TARGET DRAFT --prompts runs/data/chat/valid.jsonl --n 6

The same chat prompts (the first user turns of a chat JSONL) are decoded greedily by
`appleslm.generate.stream_tokens` (what `appleslm generate` and the chat app use) with the target
alone and with `--draft` (mlx-lm's speculative decoding), in alternating order, prompt by prompt;
figures are medians of the paired per-prompt ratios, read from mlx-lm's GenerationResponse, and
the acceptance rate is the share of generated tokens that came from the draft (`from_draft`).
Both models run as `appleslm eval` runs them on this device (on the CPU: dequantized float32,
which MLX's CPU multiplies ten times faster than its quantized kernels). Greedy speculative
decoding must give the target's own reply: the script checks that it does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appleslm.blas import blas_in_use, reexec_with_openblas  # noqa: E402

reexec_with_openblas([sys.executable, *sys.argv])

from mlx.utils import tree_flatten  # noqa: E402

from appleslm.evaluate.perplexity import load_for_evaluation  # noqa: E402
from appleslm.generate import Draft, SamplingSettings, check_vocabulary, stream_tokens  # noqa: E402


def prompts(path: Path, n: int, tokenizer) -> list[list[int]]:
    found = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        user = next((m for m in record.get("messages", []) if m["role"] == "user"), None)
        if user is not None:
            found.append(tokenizer.apply_chat_template([user], add_generation_prompt=True))
        if len(found) == n:
            break
    return found


def decode(model, tokenizer, prompt, settings, draft=None) -> dict:
    tokens, drafted = [], 0
    for response in stream_tokens(model, tokenizer, prompt, settings, draft=draft):
        tokens.append(response.token)
        drafted += response.from_draft
        final = response
    return {"tps": final.generation_tps, "tokens": tokens, "drafted": drafted}


def size(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--prompts", default="runs/data/chat/valid.jsonl")
    parser.add_argument("--n", type=int, default=6, help="prompts")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated a prompt")
    parser.add_argument("--draft-tokens", default="2,3", help="comma-separated N to measure")
    args = parser.parse_args()

    target, tokenizer = load_for_evaluation(args.target)
    draft_model, draft_tokenizer = load_for_evaluation(args.draft)
    check_vocabulary("the draft", tokenizer, draft_tokenizer)
    settings = SamplingSettings(temperature=0.0, max_tokens=args.tokens)
    chats = prompts(Path(args.prompts), args.n, tokenizer)
    t, d = size(target), size(draft_model)
    print(
        f"BLAS: {blas_in_use()}; target {args.target} ({t / 1e6:.1f}M), draft {args.draft} "
        f"({d / 1e6:.1f}M, {d / t:.3f} of it); {len(chats)} chat prompts of {args.prompts}, "
        f"{args.tokens} tokens each, greedy, paired, median of per-prompt ratios"
    )
    decode(target, tokenizer, chats[0], settings)  # warm-up
    alone = [deque(stream_tokens(draft_model, tokenizer, p, settings), 1)[0] for p in chats[:2]]
    print(f"draft alone: {statistics.median(r.generation_tps for r in alone):.1f} tok/s")
    print(f"{'N':>3s} {'plain tok/s':>12s} {'draft tok/s':>12s} {'ratio':>7s} {'accepted':>9s}")
    for n in (int(x) for x in args.draft_tokens.split(",")):
        draft = Draft(draft_model, n)
        rows = []
        for i, prompt in enumerate(chats):
            if i % 2:  # alternate which goes first
                fast = decode(target, tokenizer, prompt, settings, draft)
                plain = decode(target, tokenizer, prompt, settings)
            else:
                plain = decode(target, tokenizer, prompt, settings)
                fast = decode(target, tokenizer, prompt, settings, draft)
            if plain["tokens"] != fast["tokens"]:
                print(f"  prompt {i}: the drafted reply differs from the plain one")
            rows.append((plain, fast))
        ratio = statistics.median(f["tps"] / p["tps"] for p, f in rows)
        accepted = sum(f["drafted"] for _, f in rows) / sum(len(f["tokens"]) for _, f in rows)
        print(
            f"{n:3d} {statistics.median(p['tps'] for p, _ in rows):12.1f} "
            f"{statistics.median(f['tps'] for _, f in rows):12.1f} {ratio:6.3f}x {accepted:9.1%}"
        )


if __name__ == "__main__":
    main()
