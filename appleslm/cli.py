"""`appleslm <command>`: argument parsing only; every command is one library call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appleslm.blas import reexec_with_openblas


def cmd_info(args: argparse.Namespace) -> None:
    from appleslm.config import load_config
    from appleslm.models import Model, parameter_counts

    cfg = load_config(args.config, args.overrides)
    counts = parameter_counts(Model(cfg.model))  # lazy: shapes only, nothing is allocated
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    print(f"{args.config}:")
    for key, value in counts.items():
        print(f"  {key:22s} {value:>15,}")


def cmd_train(args: argparse.Namespace) -> None:
    from appleslm.config import load_config
    from appleslm.train.loop import train

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result.interrupted:
        return
    print(
        f"validation loss {result.val_loss:.4f}, perplexity {result.val_ppl:.2f} "
        f"after {result.tokens_seen:,} tokens"
    )
    print(f"model: {result.model_dir}   try: appleslm generate {result.model_dir} --prompt 'The'")


def cmd_eval(args: argparse.Namespace) -> None:
    from appleslm.train.evaluate import evaluate_text

    result = evaluate_text(
        args.model, args.data, seq_len=args.seq_len, trust_remote_code=args.trust_remote_code
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"loss {result['loss']:.4f}  perplexity {result['ppl']:.2f}  "
            f"over {result['tokens']:,} tokens"
        )


def cmd_generate(args: argparse.Namespace) -> None:
    from appleslm.generate import SamplingSettings, generate_text
    from appleslm.io import load_model

    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    settings = SamplingSettings(
        temperature=args.temp or 0.0, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    print(args.prompt, end="", flush=True)
    for text in generate_text(model, tokenizer, args.prompt, settings):
        print(text, end="", flush=True)
    print()


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory or a Hugging Face Hub repo id")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running a third-party model's own architecture code",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appleslm",
        description="Train, quantize, chat with and share small language models with MLX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameter counts of a config or preset")
    p.add_argument("config", help="a preset name (see configs/) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="pretrain a model from a config")
    p.add_argument("config", help="a preset name (see configs/) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides train.steps)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss and perplexity of a model on a text")
    add_model_args(p)
    p.add_argument("--data", required=True, help="a text file, folder or JSONL")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt (greedy unless --temp)")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temp", type=float, help="sampling temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    parser = build_parser()
    # Overrides may come after options (`train tiny --steps 50 train.lr=1e-3`), which argparse's
    # positional parsing cannot interleave: collect the leftovers as overrides.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from appleslm.config import ConfigError
    from appleslm.data.corpus import DataError
    from appleslm.io.model_dir import ModelDirError
    from appleslm.train.loop import TrainingError

    try:
        args.func(args)
    except (ConfigError, DataError, ModelDirError, TrainingError, FileNotFoundError) as e:
        print(f"appleslm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
