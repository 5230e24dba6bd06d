"""Generation speed inside the chat app against headless mlx-lm, side by side, in one process.

    python scripts/bench_tui.py MODEL [--prompt TEXT] [--max-tokens N] [--runs N]

Both sides decode the same prompt (the chat template applied to one user message) greedily from
an empty cache with the same model weights: headless is `mlx_lm.stream_generate`; "app" is the
real `ChatApp` running headless under Textual's test driver (layout, Markdown streaming and the
speed panel all render; only the terminal writes are skipped), its figure read from the speed
panel, i.e. from the same `GenerationResponse` field. Runs are paired and their order alternates,
so drift on a shared machine hits both sides; the script prints every pair and the medians.
The issue's bar: the UI may cost at most 3% of generation tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appleslm.generate import ChatSession, SamplingSettings  # noqa: E402
from appleslm.io.model_dir import load_model  # noqa: E402
from appleslm_tui.app import ChatApp  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def headless(model, tokenizer, ids: list[int], max_tokens: int) -> tuple[float, int, float]:
    """(generation tok/s, tokens, ttft s) of mlx-lm alone."""
    start = time.perf_counter()
    ttft, last = None, None
    for response in stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens, prompt_cache=make_prompt_cache(model)
    ):
        ttft = ttft if ttft is not None else time.perf_counter() - start
        last = response
    return last.generation_tps, last.generation_tokens, ttft


async def in_app(app: ChatApp, pilot, prompt: str) -> tuple[float, int, float]:
    """(generation tok/s, tokens, ttft s) as the app's speed panel shows them."""
    await app.action_new_chat()
    app.session.reset()  # an empty cache, like the headless side
    app.prompt.load_text(prompt)
    await pilot.press("enter")
    while len(app.history) < 2 or app.generating:
        await asyncio.sleep(0.25)  # not pilot.pause: that waits for the UI to go idle, work
    stats = app.speed.stats
    return stats.generation_tps, stats.generation_tokens, stats.ttft


async def bench(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model)
    messages = [{"role": "user", "content": args.prompt}]
    ids = ChatSession(model, tokenizer).render(messages)
    home = tempfile.mkdtemp(prefix="bench-tui-")
    app = ChatApp(
        args.model,
        home=home,
        settings=SamplingSettings(max_tokens=args.max_tokens),
        model_roots=[],
        hub_cache=False,
        pick_model_on_start=False,
    )
    async with app.run_test(size=(args.width, args.height)) as pilot:
        while app.session is None:
            await pilot.pause(0.05)
        print(
            f"model {args.model}: prompt {len(ids)} tokens, up to {args.max_tokens} new, "
            f"{args.runs} paired runs (+1 warm-up), terminal {args.width}x{args.height}"
        )
        headless(model, tokenizer, ids, args.max_tokens)  # warm-up: compile, caches
        await in_app(app, pilot, args.prompt)
        rows = []
        for run in range(args.runs):
            if run % 2 == 0:
                h = headless(model, tokenizer, ids, args.max_tokens)
                a = await in_app(app, pilot, args.prompt)
            else:
                a = await in_app(app, pilot, args.prompt)
                h = headless(model, tokenizer, ids, args.max_tokens)
            rows.append((h, a))
            print(
                f"  run {run + 1}: headless {h[0]:8.1f} tok/s ({h[1]} tok)   "
                f"app {a[0]:8.1f} tok/s ({a[1]} tok)   ratio {a[0] / h[0]:.3f}"
            )
    head = statistics.median(h[0] for h, _ in rows)
    app_tps = statistics.median(a[0] for _, a in rows)
    ratio = statistics.median(a[0] / h[0] for h, a in rows)
    print(
        f"median generation tok/s: headless {head:.1f}, app {app_tps:.1f}; "
        f"median paired ratio {ratio:.3f} → UI cost {100 * (1 - ratio):+.1f}% "
        f"({'within' if ratio >= 0.97 else 'OVER'} the 3% budget)"
    )
    print(
        f"median TTFT: headless {statistics.median(h[2] for h, _ in rows):.3f}s, "
        f"app {statistics.median(a[2] for _, a in rows):.3f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model directory or Hub repo id")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--height", type=int, default=24)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
