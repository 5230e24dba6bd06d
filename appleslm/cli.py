"""`appleslm <command>`: argument parsing only; every command is one library call."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from appleslm import __version__
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


def cmd_train(args: argparse.Namespace) -> int | None:
    from appleslm.config import load_config
    from appleslm.train.launch import data_parallel_procs, run_local_ranks
    from appleslm.train.pretrain import train

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    procs = data_parallel_procs(args.procs, cfg.train.batch_size, cfg.train.grad_accum)
    if procs > 1:
        return run_local_ranks(procs, args.argv)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = train(
        cfg, out, resume=args.resume, progress=not args.no_progress, verbose=args.verbose
    )
    if result.interrupted:
        return
    if result.val_loss is not None:
        print(
            f"validation loss {result.val_loss:.4f}, perplexity {result.val_ppl:.2f} "
            f"after {result.tokens_seen:,} tokens"
        )
    try_it = hint("generate", result.model_dir, "--prompt", "The")
    print(f"model: {result.model_dir}   try: {try_it}")


def cmd_distill(args: argparse.Namespace) -> int | None:
    from appleslm.config import DistillConfig, build_dataclass
    from appleslm.train.distill import distill, student_config
    from appleslm.train.launch import data_parallel_procs, run_local_ranks

    values = {"temperature": args.temperature, "ce_weight": args.ce_weight}
    settings = build_dataclass(
        DistillConfig, {k: v for k, v in values.items() if v is not None}, "distill"
    )
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = student_config(args.teacher, args.student, overrides)
    procs = data_parallel_procs(args.procs, cfg.train.batch_size, cfg.train.grad_accum)
    if procs > 1:
        return run_local_ranks(procs, args.argv)
    result = distill(
        args.teacher,
        cfg,
        args.out,
        settings=settings,
        resume=args.resume,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    if result.interrupted:
        return
    if result.val_loss is not None:
        print(
            f"student validation loss {result.val_loss:.4f}, perplexity {result.val_ppl:.2f} "
            f"after {result.tokens_seen:,} tokens"
        )
    try_it = hint("generate", args.teacher, "--draft", result.model_dir, "--prompt", "The")
    print(f"model: {result.model_dir}   try: {try_it}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from appleslm.train.sweep import run_sweep

    runs = run_sweep(
        args.sweep,
        out=args.out,
        only=args.only,
        procs=args.procs,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    done = [r for r in runs if r.finished]
    print(f"{len(done)} of {len(runs)} runs finished")
    if done:
        folders = {r.run_dir.parent for r in done}
        if len(done) <= 6 or len(folders) > 1:
            print("measure them: " + hint("density", *(r.run_dir for r in done)))
        else:  # a long study by its folder (the glob left for the shell)
            print("measure them: " + hint("density", folders.pop()) + "/*")


def cmd_eval(args: argparse.Namespace) -> None:
    from appleslm.evaluate.perplexity import evaluate_text

    result = evaluate_text(
        model_choice(args),
        args.data,
        seq_len=args.seq_len,
        trust_remote_code=args.trust_remote_code,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result))
        return
    bpb = f"  bits/byte {result['bpb']:.4f}" if result.get("bpb") is not None else ""
    print(
        f"loss {result['loss']:.4f}  perplexity {result['ppl']:.2f}{bpb}  over "
        f"{result['tokens']:,} tokens ({result['bytes']:,} bytes) of {result['data']}"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from appleslm.evaluate.zeroshot import evaluate_tasks, format_table

    report = evaluate_tasks(
        args.model,
        args.tasks,
        data=args.data,
        limit=args.limit,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))


def sampling_settings(args: argparse.Namespace, defaults=None):
    """The sampling flags of `generate` and `chat` as settings; a bad value is exit 2."""
    from appleslm.generate import GenerationError, SamplingSettings

    given = {
        name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None
    }
    try:
        return SamplingSettings.from_dict(given, defaults)
    except ValueError as e:
        raise GenerationError(str(e)) from None


def model_choice(args: argparse.Namespace):
    """MODEL and its flags (`--proxy`, `--alpha`, `--draft`, `--draft-tokens`) as a ModelChoice."""
    from appleslm.generate import ModelChoice

    return ModelChoice(
        args.model,
        proxy=tuple(args.proxy) if args.proxy else None,
        alpha=1.0 if args.alpha is None else args.alpha,
        draft=getattr(args, "draft", None),
        draft_tokens=getattr(args, "draft_tokens", 3),
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from appleslm.generate import ChatSession, GenerationError, load_choice

    settings = sampling_settings(args)
    if not args.prompt.strip():
        raise GenerationError("--prompt is empty: give the text to answer or continue")
    choice = model_choice(args)
    model, tokenizer, draft = load_choice(choice, trust_remote_code=args.trust_remote_code)
    session = ChatSession(model, tokenizer, chat_template=not args.no_chat_template, draft=draft)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    print("=" * 10)
    for response in session.stream(messages, settings):
        print(response.text, end="", flush=True)
    print("\n" + "=" * 10)
    stats = session.stats
    print(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
    print(
        f"Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.3f} tokens-per-sec"
    )
    if stats.acceptance is not None:
        print(
            f"Draft: {stats.draft_tokens} of {stats.generation_tokens} tokens accepted "
            f"({stats.acceptance:.1%}), {draft.tokens} drafted a step"
        )
    print(f"Peak memory: {stats.peak_memory:.3f} GB")
    if stats.generation_tokens <= 1 and stats.finish_reason == "stop":
        mode = "its chat template" if session.chat_mode else "raw completion"
        other = "--no-chat-template" if session.chat_mode else "a chat model or another prompt"
        print(
            f"note: the model ended its reply at once (with {mode}); try {other}",
            file=sys.stderr,
        )


def cmd_sft(args: argparse.Namespace) -> int | None:
    from appleslm.config import SFTConfig, build_dataclass, section_overrides
    from appleslm.train.launch import data_parallel_procs, run_local_ranks
    from appleslm.train.sft import default_run_dir, sft

    names = ("lora_rank", "lora_layers", "steps", "batch_size", "lr", "max_seq_len", "seed")
    values = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    values.update(lora=args.lora, on_error=args.on_error)
    values.update(section_overrides(args.overrides, "sft"))
    cfg = build_dataclass(SFTConfig, values, "sft")
    procs = data_parallel_procs(args.procs, cfg.batch_size, cfg.grad_accum)
    if procs > 1:
        return run_local_ranks(procs, args.argv)
    out = Path(args.out) if args.out else default_run_dir(args.model)
    result = sft(
        args.model,
        args.data,
        out,
        cfg,
        resume=args.resume,
        progress=not args.no_progress,
        verbose=args.verbose,
        trust_remote_code=args.trust_remote_code,
    )
    if result.interrupted:
        return
    if result.val_loss is not None and result.val_loss_before is not None:
        print(
            f"held-out assistant-token loss {result.val_loss_before:.4f} -> {result.val_loss:.4f}"
        )
    print(f"model: {result.model_dir}   try: {hint('chat', result.model_dir)}")


def cmd_chat_data(args: argparse.Namespace) -> None:
    from appleslm.data.chat import convert_default_data

    info = convert_default_data(
        args.out, source=args.source, val_fraction=args.val_fraction, seed=args.seed
    )
    print(
        f"{info['train']:,} training / {info['valid']:,} validation conversations "
        f"from {info['source']} in {info['out_dir']}"
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from appleslm.generate import GenerationError
    from appleslm_tui.app import CHAT_DEFAULTS, run_chat

    settings = sampling_settings(args, CHAT_DEFAULTS)
    if len(args.model) > 2:
        raise GenerationError(
            f"chat takes one model, or two for a side-by-side arena, not {len(args.model)}"
        )
    if not args.model and (args.proxy or args.alpha is not None or args.draft):
        raise GenerationError("--proxy and --draft need a MODEL to apply to")
    if args.one_at_a_time and len(args.model) != 2:
        raise GenerationError("--one-at-a-time is for the arena: give two models")
    options = dict(
        system_prompt=args.system, settings=settings, trust_remote_code=args.trust_remote_code
    )
    if len(args.model) == 2:
        from appleslm_tui.arena import run_arena

        # The flags make the second model: `chat base base --proxy E A` compares the two.
        first, args.model = args.model
        run_arena(first, model_choice(args), one_at_a_time=args.one_at_a_time, **options)
        return
    args.model = args.model[0] if args.model else None
    run_chat(None if args.model is None else model_choice(args), **options)


def cmd_merge(args: argparse.Namespace) -> None:
    from appleslm.io.merge import merge

    result = merge(
        args.models,
        args.out,
        config=args.config,
        weights=args.weights,
        last=args.last,
        greedy=args.greedy,
        eval_data=args.eval_data,
        max_eval_tokens=args.max_tokens,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    kept = len(result.chosen)
    print(
        f"merged {kept} of {len(result.ingredients)} models ({result.method}) into "
        f"{result.out_dir}"
        + ("" if result.loss is None else f": {result.eval_label} {result.loss:.4f}")
    )
    print(f"try: {hint('chat', result.out_dir)}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from appleslm.quant import format_report, quantize

    report = quantize(
        args.model,
        args.out,
        bits=args.bits,
        group_size=args.group_size,
        recipe=args.recipe,
        eval_text=args.eval_text,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    print(format_report(report))


def cmd_export(args: argparse.Namespace) -> None:
    from appleslm.io.export import export_stock
    from appleslm.io.files import read_config

    out = export_stock(args.model, args.out, overwrite=args.overwrite)
    kind = read_config(out)["model_type"]
    print(f"exported to {out}: a stock {kind} checkpoint; load it with mlx_lm.load({str(out)!r})")


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from appleslm.io.gguf import import_gguf

    out = import_gguf(args.file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"imported to {out}; chat with it: {hint('chat', out)}")


def cmd_push(args: argparse.Namespace) -> None:
    from appleslm.io.push import push_model

    result = push_model(
        args.model,
        args.repo_id,
        private=args.private,
        endpoint=args.endpoint,
        dry_run=args.dry_run,
        commit_message=args.message,
    )
    if result.dry_run:
        print(f"dry run: would upload to {args.repo_id}:")
        for name in result.files:
            print(f"  {name:32s} {result.sizes.get(name, 0):>12,} bytes")
        print("\nmodel card:\n" + str(result.card))
        return
    print(f"pushed to {result.url} (commit {result.commit})")


def cmd_density(args: argparse.Namespace) -> None:
    from appleslm.density import density_report, format_table

    report = density_report(
        args.run_dirs,
        params_key=args.params_key,
        plot_path=None if args.no_plot else args.plot,
        ladder=args.ladder,
        ladder_variant=args.ladder_variant,
        densing=args.densing,
        irreducible=args.irreducible,
        z=args.sigma,
        metric=args.metric,
    )
    print(json.dumps(report, indent=2) if args.json else format_table(report))


def program() -> str:
    """How to run appleslm from this shell, as typed: `appleslm` when that is this installation
    on PATH, else the venv's script or `python -m appleslm` (a venv that is not activated)."""
    script = Path(sys.executable).parent / "appleslm"
    on_path = shutil.which("appleslm")
    if on_path and script.is_file() and Path(on_path).resolve() == script.resolve():
        return "appleslm"
    if script.is_file():
        return shlex.quote(_short(script))
    return shlex.join([_short(Path(sys.executable)), "-m", "appleslm"])


def _short(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (`.venv/bin/appleslm`)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def hint(*words: str | Path) -> str:
    """A command line for what to do next that works as typed, from this shell."""
    return " ".join([program(), *(shlex.quote(str(w)) for w in words)])


SAMPLING_FLAGS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_tokens",
    "seed",
)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens_default: int | None = None) -> None:
    """The sampling flags `generate` and `chat` share (mlx-lm's names)."""
    p.add_argument("--temp", dest="temperature", type=float, help="temperature (0: greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, help="keep the k likeliest tokens (0: off)")
    p.add_argument("--min-p", type=float, help="minimum probability relative to the top (0: off)")
    p.add_argument("--repetition-penalty", type=float, help="penalise repeats (1: off)")
    p.add_argument("--max-tokens", type=int, default=max_tokens_default, help="reply length limit")
    p.add_argument("--seed", type=int, help="random seed for sampling")


def add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--proxy",
        nargs=2,
        metavar=("EXPERT", "ANTIEXPERT"),
        help="proxy-tune: next-token logits = model + alpha * (expert - anti-expert); both share "
        "the model's vocabulary",
    )
    p.add_argument("--alpha", type=float, help="proxy-tuning strength (default 1)")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft",
        metavar="DRAFT",
        help="a small model with the same vocabulary: speculative decoding (mlx-lm's)",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=3, help="tokens the draft proposes a step (default 3)"
    )


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    """`--verbose` of the training commands: their log names library paths (the BLAS) too."""
    p.add_argument("--verbose", action="store_true", help="log the BLAS library's path too")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory or a Hugging Face Hub repo id")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running a third-party model's own architecture code",
    )


def add_procs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--procs",
        type=int,
        help="local data-parallel processes (default: one per core on the CPU, 1 on a GPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appleslm",
        description="Train, quantize, chat with and share small language models with MLX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    add_procs_arg(p)
    add_verbose_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "distill", help="train a small student to match a teacher's next-token distribution"
    )
    p.add_argument("teacher", help="the teacher: a model directory or Hub repo id")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the student")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--student", default="tiny", help="the student's preset or YAML (default tiny)")
    p.add_argument("--temperature", type=float, help="softmax temperature of the KL (default 2)")
    p.add_argument(
        "--ce-weight",
        type=float,
        help="share of plain cross-entropy in the loss, 0 to 1 (default 0: KL only)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps (overrides train.steps)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_procs_arg(p)
    add_verbose_arg(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sweep", help="train a ladder of runs (resumable, run by run)")
    p.add_argument("sweep", help="a sweep YAML file (see configs/sweeps/)")
    p.add_argument("--out", help="folder for the runs (default: the file's `out`)")
    p.add_argument(
        "--only", nargs="+", metavar="NAME", help="train only these runs (a name covers its seeds)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_procs_arg(p)
    add_verbose_arg(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on a text")
    add_model_args(p)
    p.add_argument(
        "--data",
        help="a text file, folder or JSONL, or 'default' (the bundled corpus); "
        "default: the held-out split of the data the model was trained on",
    )
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    add_proxy_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "evaluate",
        help="zero-shot accuracy on ARC, BoolQ, PIQA, SIQA, HellaSwag, ... (lm-eval's way)",
    )
    add_model_args(p)
    p.add_argument(
        "--tasks",
        default="all",
        help="comma-separated: arc_easy, arc_challenge, boolq, piqa, social_iqa, hellaswag, "
        "openbookqa, winogrande, lambada_openai, or all (default)",
    )
    p.add_argument(
        "--data",
        help="a folder of <task>.jsonl files, one task's .jsonl, 'hf' (the Hugging Face "
        "datasets cache) or 'sanity' (the small sets shipped with appleslm); default: the "
        "datasets cache where it holds the task, else the shipped set",
    )
    p.add_argument("--limit", type=int, help="score only the first N questions of each task")
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="put each question in a user turn of the model's chat template (default: plain text)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "generate",
        help="answer (chat models) or continue (base models) a prompt; greedy unless --temp",
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default="", help="system prompt (chat models)")
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="raw completion of the prompt even when the model has a chat template",
    )
    add_proxy_args(p)
    add_draft_args(p)
    add_sampling_args(p, max_tokens_default=256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sft", help="fine-tune a model to chat (loss on assistant turns only)")
    add_model_args(p)
    p.add_argument(
        "--data",
        default="default",
        help="JSONL of {'messages': [...]} or "
        "{'prompt','completion'} records, a folder with train.jsonl (+ valid.jsonl), "
        "or 'default' (chatterbot-corpus)",
    )
    p.add_argument("--out", help="run directory (default runs/<model>-chat); model in OUT/model")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters, fused at the end")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-layers", type=int, help="adapt only the last N unique blocks")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument(
        "--max-seq-len",
        type=int,
        help="longest conversation in tokens "
        "(default: the model's context); longer ones are bad records",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--on-error",
        choices=["skip", "refuse"],
        default="skip",
        help="bad records: skip them (listed with line numbers) or refuse the data",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_procs_arg(p)
    add_verbose_arg(p)
    p.add_argument("overrides", nargs="*", help="sft.key=value overrides, e.g. sft.grad_accum=2")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("chat-data", help="write the pip-installed chat corpus as train/valid JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--source", choices=["chatterbot", "chitchat"], default="chatterbot")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_chat_data)

    p = sub.add_parser("chat", help="chat with a model in the terminal UI, or two side by side")
    p.add_argument(
        "model",
        nargs="*",
        help="a model directory or Hub repo id (or pick in the app); two: an arena, the same "
        "prompt to both, where --proxy and --draft apply to the second",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running a third-party model's own architecture code",
    )
    p.add_argument("--system", default="", help="system prompt for new conversations")
    add_proxy_args(p)
    add_draft_args(p)
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="arena: the second reply starts when the first ends, so each speed is the model's "
        "alone (default: both stream at once, a token of each in turn)",
    )
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "merge",
        help="average models of one architecture: uniform/weighted/greedy soup, last checkpoints",
    )
    p.add_argument(
        "models",
        nargs="*",
        help="model directories or Hub repo ids; with --last, one training run directory",
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--weights", type=float, nargs="+", help="one weight a model (normalised)")
    p.add_argument("--last", type=int, metavar="K", help="average a run's last K checkpoints")
    p.add_argument("--config", help="a mergekit-style YAML (models, merge_method, dtype)")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="greedy soup: add models best first, keep each only if --eval-data's loss holds",
    )
    p.add_argument(
        "--eval-data",
        help="held-out data: chat JSONL (or a folder with valid.jsonl) or text; every model "
        "and the merge are measured on it",
    )
    p.add_argument("--max-tokens", type=int, help="measure on at most this many text tokens")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("quantize", help="MLX affine quantization with a perplexity report")
    add_model_args(p)
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 6, 8])
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument(
        "--recipe",
        default="uniform",
        choices=["uniform", "mixed"],
        help="mixed: embedding and output head at 8 bits",
    )
    p.add_argument(
        "--eval-text",
        help="text to measure perplexity on (default: the validation split of the training corpus)",
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a plain llama checkpoint stock mlx-lm loads")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-gguf", help="convert a Llama-architecture GGUF to a model dir")
    p.add_argument("file", help="a .gguf file")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument(
        "--dtype",
        default="keep",
        help="keep (default): the file's quantization as MLX quantized weights, fastest on a "
        "Mac; float16 or float32: dequantize (float32 is fastest on Linux's CPU backend)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("push", help="upload a model directory to the Hugging Face Hub")
    add_model_args(p)
    p.add_argument("repo_id", help="namespace/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--dry-run", action="store_true", help="show what would be uploaded")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("density", help="effective parameters of runs against a dense ladder")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run or model directories")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--params-key",
        default="params_total",
        help="which parameter count is N (e.g. params_non_embedding)",
    )
    p.add_argument(
        "--ladder",
        action="append",
        metavar="NAME",
        help="a run in the dense ladder (repeatable); default: every run whose "
        "variant is --ladder-variant",
    )
    p.add_argument("--ladder-variant", default="dense")
    p.add_argument(
        "--densing",
        action="store_true",
        help="fit L = a*N^-alpha + b*D^-beta, for a ladder that varies tokens",
    )
    p.add_argument(
        "--irreducible",
        action="store_true",
        help="with --densing, also fit an irreducible loss term e",
    )
    p.add_argument("--sigma", type=float, default=1.0, help="width of reported ranges")
    p.add_argument(
        "--metric",
        choices=["loss", "bpb"],
        default="loss",
        help="fit the validation loss (nats/token) or bits per byte, which puts ladders with "
        "different vocabularies, or byte-level models, on one axis",
    )
    p.add_argument("--plot", type=Path, default=Path("density.png"), help="PNG to write")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_density)
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
    if args.command is None:  # bare `appleslm`: what it can do, as pip and mlx-lm answer
        parser.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what data-parallel ranks rerun
    from appleslm.errors import AppleslmError
    from appleslm.train.launch import PEER_LOST, lost_a_peer

    try:
        status = args.func(args) or 0
        sys.stdout.flush()  # a reader gone meanwhile is met here, not in the flush at exit
        return status
    except AppleslmError as e:
        print(f"appleslm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `appleslm density ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141  # what a shell reports for a process killed by SIGPIPE
    except RuntimeError as e:
        if lost_a_peer(e):  # the launcher reports the rank that went away
            return PEER_LOST
        raise
