"""Training speed of appleslm against mlx-lm's own Llama, side by side in one process.

  python scripts/bench_train.py            # all three comparisons, ~10M-parameter shapes
  python scripts/bench_train.py --quick    # ~1M shapes, for a smoke run
  python scripts/bench_train.py --baseline 4e7e996 [--preset tiny | --shape 10m]
                                           # the Trainer of another commit, side by side
  python scripts/bench_train.py --baseline 4e7e996 --commands [--steps 40]
                                           # whole `appleslm train` runs of both, alternating
  python scripts/bench_train.py --commands --anchor llama --shape 10m
                                           # ... against a plain loop around llama.Model

1. step:      one compiled AdamW step of our dense model vs `mlx_lm.models.llama.Model` at the same
              shape, dtype and batch (target: ours >= 1.0x).
2. generator: our Leviathan generator input vs a table embedding, same body (target: <= 10%
              step-time overhead; the paper reports 23-51%).
3. loop:      `appleslm train`'s Trainer step (data, accumulation, logging state) vs a plain loop
              around llama.Model on the same batches: tokens/s and peak memory (targets: >= 1.0x,
              <= 1.0x).
4. baseline:  `appleslm train`'s Trainer step of the code of another commit (extracted with
              `git archive` into a temporary directory, never a worktree) against this tree's, in
              two resident child processes (each imports its own `appleslm`) that take one step
              each in turn, so every step of one side has a neighbour of the other under the
              same load; median of paired step-time ratios.
   --commands: whole `appleslm train` runs instead, alternating between the two trees, each run
              as its command runs by default (so this tree's with one data-parallel rank per
              core on the CPU); tokens/s is the median of each run's own per-step records after
              the warm-up steps, and the two loss curves are compared step by step.
Each comparison interleaves the two sides and reports the median of paired ratios, because this
machine drifts by 20-30% between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appleslm.blas import blas_in_use, reexec_with_openblas  # noqa: E402

reexec_with_openblas([sys.executable, *sys.argv])

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

from appleslm.config import DataConfig, RunConfig, TrainConfig, load_config  # noqa: E402
from appleslm.models import Model, ModelArgs, parameter_counts  # noqa: E402
from appleslm.train.losses import model_batch, to_mx, token_loss  # noqa: E402
from appleslm.train.pretrain import Pretraining  # noqa: E402
from appleslm.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # the ~10M and ~1M deep-thin shapes of shared/reference/perf-baselines.md
    "10m": dict(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=14,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=704,
    ),
    "1m": dict(
        vocab_size=8192,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=320,
    ),
}
GENERATOR = dict(
    embedding="leviathan",
    tie_word_embeddings=False,
    generator_d_seed=64,
    generator_heads=4,
    generator_knots=16,
    generator_rank=8,
)


def mean_token_loss(model, batch):
    total, count = token_loss(model, batch)
    return total / count


def compiled_step(model: nn.Module, loss, lr: float = 1e-3):
    optimizer = optim.AdamW(lr, weight_decay=0.1, bias_correction=True)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        value, grads = loss_and_grad(model, *batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return value

    def run(*batch) -> float:
        value = step(*batch)
        mx.eval(value, state)
        return value.item()

    return run


def llama_args(shape: dict) -> llama.ModelArgs:
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        intermediate_size=shape["intermediate_size"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        rms_norm_eps=1e-5,
        vocab_size=shape["vocab_size"],
        tie_word_embeddings=True,
    )


def llama_loss(model, x, y):
    return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean")


def paired(a, b, reps: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median seconds of a and b, and the median of per-pair ratios b/a (a's speed-up)."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return (
        statistics.median(ta),
        statistics.median(tb),
        statistics.median(y / x for x, y in zip(ta, tb)),
    )


def batch(shape: dict, batch_size: int, seq_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, shape["vocab_size"], size=(batch_size, seq_len + 1))
    return w[:, :-1], w[:, 1:]


def bench_step(shape, dtype, batch_size, seq_len, reps):
    x, y = batch(shape, batch_size, seq_len)
    ours = Model(ModelArgs(**shape))
    anchor = llama.Model(llama_args(shape))
    for m in (ours, anchor):
        m.set_dtype(dtype)
    ours_step, anchor_step = compiled_step(ours, mean_token_loss), compiled_step(anchor, llama_loss)
    xs, ys = mx.array(x), mx.array(y)
    ours_batch = to_mx(model_batch(ours, x, y))
    t_ours, t_anchor, ratio = paired(
        lambda: ours_step(ours_batch), lambda: anchor_step(xs, ys), reps
    )
    tokens = batch_size * seq_len
    print(
        f"[step] ours {tokens / t_ours:.0f} tok/s, mlx-lm llama {tokens / t_anchor:.0f} tok/s, "
        f"ours/mlx-lm speed = {ratio:.3f}x (median of {reps} paired runs)"
    )


def bench_generator(shape, dtype, batch_size, seq_len, reps):
    x, y = batch(shape, batch_size, seq_len)
    table = Model(ModelArgs(**shape))
    untied = Model(ModelArgs(**shape, tie_word_embeddings=False))
    lev = Model(ModelArgs(**shape, **GENERATOR))
    for m in (table, untied, lev):
        m.set_dtype(dtype)
    counts = {
        name: parameter_counts(m)["params_total"] / 1e6
        for name, m in (("tied", table), ("untied", untied), ("leviathan", lev))
    }
    models = {"tied": table, "untied": untied, "leviathan": lev}
    steps = {name: compiled_step(m, mean_token_loss) for name, m in models.items()}
    inputs = {name: to_mx(model_batch(m, x, y)) for name, m in models.items()}
    for anchor in ("tied", "untied"):
        t_lev, t_anchor, ratio = paired(
            lambda: steps["leviathan"](inputs["leviathan"]),
            lambda a=anchor: steps[a](inputs[a]),
            reps,
        )
        print(
            f"[generator] leviathan {counts['leviathan']:.2f}M vs {anchor} table "
            f"{counts[anchor]:.2f}M: step {t_lev * 1e3:.0f} ms vs {t_anchor * 1e3:.0f} ms, "
            f"overhead {100 * (1 / ratio - 1):+.1f}% (median of {reps} paired runs; "
            f"{int(inputs['leviathan']['unique_ids'].size)} distinct ids evaluated for "
            f"{batch_size * seq_len} positions)"
        )


def bench_loop(shape, dtype, batch_size, seq_len, reps):
    """Our Trainer's step against a hand-written loop around llama.Model, same batches."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(
            model=ModelArgs(**shape),
            data=DataConfig(source="default", cache_dir=str(Path(tmp) / "cache")),
            train=TrainConfig(
                steps=10**6,
                batch_size=batch_size,
                seq_len=seq_len,
                dtype="bfloat16" if dtype == mx.bfloat16 else "float32",
            ),
        )
        task = Pretraining(cfg, Path(tmp) / "run")
        trainer = Trainer(task, cfg.train, Path(tmp) / "run", progress=False, log=lambda m: None)
        anchor = llama.Model(llama_args(shape))
        anchor.set_dtype(dtype)
        anchor_step = compiled_step(anchor, llama_loss)
        batches = iter(lambda: task.batches.next_batch(), None)

        def ours():
            trainer.train_step(task.step_batch(trainer.step))

        def theirs():
            x, y = next(batches)
            anchor_step(mx.array(x), mx.array(y))

        t_ours, t_anchor, ratio = paired(ours, theirs, reps)
        tokens = batch_size * seq_len
        peaks = {}
        for name, fn in (("ours", ours), ("mlx-lm", theirs)):
            mx.clear_cache()
            mx.reset_peak_memory()
            fn()
            peaks[name] = mx.get_peak_memory() / 2**20
        print(
            f"[loop] appleslm train {tokens / t_ours:.0f} tok/s, llama loop "
            f"{tokens / t_anchor:.0f} tok/s, speed ratio {ratio:.3f}x; peak memory of one step "
            f"(both models resident) {peaks['ours']:.0f} MiB vs {peaks['mlx-lm']:.0f} MiB"
        )


BASELINE_CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
from appleslm.config import load_config

spec = json.loads(sys.argv[1])
cfg = load_config(spec["preset"], spec["overrides"])
with tempfile.TemporaryDirectory() as tmp:
    run_dir = Path(tmp) / "run"
    try:  # the one-trainer layout: a task and the Trainer that runs it
        from appleslm.train.pretrain import Pretraining
        from appleslm.train.trainer import Trainer

        task = Pretraining(cfg, run_dir)
        trainer = Trainer(task, cfg.train, run_dir, progress=False, log=lambda message: None)
        step = lambda: trainer.train_step(task.step_batch(trainer.step))
    except ImportError:  # before it: appleslm.train.loop's pretraining Trainer
        from appleslm.train.loop import Trainer

        step = Trainer(cfg, run_dir, progress=False, log=lambda message: None).train_step
    for _ in range(spec["warmup"]):
        step()
    print("ready", flush=True)
    for line in sys.stdin:  # one step per request: the parent interleaves the children
        if line.strip() != "step":
            break
        start = time.perf_counter()
        step()
        print(json.dumps([time.perf_counter() - start, os.getloadavg()[0]]), flush=True)
"""


def extract_commit(commit: str, into: Path) -> Path:
    """The tree of `commit` as plain files (git archive: no worktree, no repository change)."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def shape_overrides(args) -> list[str]:
    """A bench shape as config overrides of the preset (none without --shape)."""
    if not args.shape:
        return []
    overrides = [f"model.{key}={value}" for key, value in SHAPES[args.shape].items()]
    overrides += ["model.tie_word_embeddings=true", "model.max_position_embeddings=512"]
    return overrides + [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}"]


def bench_baseline(args) -> None:
    """Two resident child processes, each with its own `appleslm`, stepping in turn."""
    overrides = shape_overrides(args)
    with tempfile.TemporaryDirectory() as tmp:
        tree = extract_commit(args.baseline, Path(tmp))
        sides = {args.baseline: tree, "current": ROOT}
        children = {}
        for name, tree_dir in sides.items():
            spec = dict(preset=args.preset, overrides=overrides, warmup=2)
            children[name] = subprocess.Popen(
                [sys.executable, "-c", BASELINE_CHILD, json.dumps(spec)],
                env=dict(os.environ, PYTHONPATH=str(tree_dir)),
                cwd=tree_dir,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        try:
            for name, child in children.items():
                for line in child.stdout:  # skip anything printed before the handshake
                    if line.strip() == "ready":
                        break
                else:
                    raise SystemExit(f"{name} failed to start (see its error output above)")
            times = {name: [] for name in sides}
            loads = []
            for _ in range(args.reps * args.steps):
                for name, child in children.items():
                    child.stdin.write("step\n")
                    child.stdin.flush()
                    seconds, load = json.loads(child.stdout.readline())
                    times[name].append(seconds)
                    loads.append(load)
        finally:
            for child in children.values():
                child.stdin.close()
                child.wait()
    cfg = load_config(args.preset, overrides)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    what = args.shape or args.preset
    n = args.reps * args.steps
    print(
        f"{what} ({tokens} tokens/step), Trainer steps interleaved across two resident child "
        f"processes, {n} steps each; load {min(loads):.2f}-{max(loads):.2f}:"
    )
    base = times[args.baseline]
    for name in sides:
        ratio = statistics.median(b / m for m, b in zip(times[name], base))
        rate = tokens / statistics.median(times[name])
        print(f"  {name:18s} {rate:7.0f} tok/s   {ratio:.2f}x {args.baseline} (median of paired)")


def bench_commands(args) -> None:
    # A warmup shorter than the run: since 4e7e996 one longer than the run is cut to fit it,
    # which would change the baseline's learning rates and so its loss curve.
    overrides = ["train.log_every=1", f"train.eval_every={args.steps}", "train.warmup_steps=5"]
    overrides += shape_overrides(args)
    what = args.shape or args.preset
    with tempfile.TemporaryDirectory() as tmp:
        if args.anchor == "llama":
            anchor = "llama loop"
            sides = {anchor: [sys.executable, __file__, "--llama-child"], "current": None}
            trees = {anchor: ROOT, "current": ROOT}
        else:
            anchor = args.baseline
            trees = {anchor: extract_commit(args.baseline, Path(tmp)), "current": ROOT}
            sides = dict.fromkeys(trees)
        rates = {name: [] for name in sides}
        losses, loads = {}, []
        for rep in range(args.reps):
            for name, child in sides.items():
                out = Path(tmp) / f"{rep}-{name.replace(' ', '-')}"
                train = [sys.executable, "-m", "appleslm", "train", args.preset]
                command = list(child or [*train, "--out", str(out), "--no-progress"])
                command += ["--steps", str(args.steps)] + ([] if child else overrides)
                if child:
                    command += ["--preset", args.preset, "--out", str(out), "--", *overrides]
                env = dict(os.environ, PYTHONPATH=str(trees[name]))
                loads.append(os.getloadavg()[0])
                subprocess.run(command, cwd=trees[name], env=env, check=True, capture_output=True)
                records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
                steps = [r for r in records if r["kind"] == "train"]
                rates[name].append(statistics.median(r["tok_per_s"] for r in steps[3:]))
                losses[name] = [r["loss"] for r in steps]
    base = rates[anchor]
    print(
        f"{what}: whole runs of {args.steps} steps, {args.reps} of each side alternating "
        f"(current: `appleslm train` as it runs by default); load {min(loads):.2f}-"
        f"{max(loads):.2f}:"
    )
    for name in sides:
        ratio = statistics.median(m / b for m, b in zip(rates[name], base))
        rate = statistics.median(rates[name])
        print(f"  {name:18s} {rate:7.0f} tok/s   {ratio:.2f}x {anchor} (median of paired)")
    if args.baseline:  # the same model and recipe: the same curve
        gap = max(abs(a - b) for a, b in zip(losses[anchor], losses["current"]))
        print(f"  loss curves: largest difference over {args.steps} steps {gap:.2e}")


def llama_child(args) -> None:
    """One process training `llama.Model` of the config's shape on our batches with a plain
    compiled AdamW loop (no accumulation, clipping or checkpoints), writing per-step records
    as `appleslm train` does (metrics.jsonl in --out)."""
    cfg = load_config(args.preset, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True)
    task = Pretraining(cfg, out / "run")
    Trainer(task, cfg.train, out / "run", progress=False, log=lambda message: None)
    shape = {key: getattr(cfg.model, key) for key in SHAPES["10m"]}
    model = llama.Model(llama_args(shape))
    step = compiled_step(model, llama_loss, lr=cfg.train.lr)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    with (out / "metrics.jsonl").open("w") as metrics:
        for _ in range(args.steps):
            x, y = task.batches.next_batch()
            start = time.perf_counter()
            loss = step(mx.array(x), mx.array(y))
            rate = tokens / (time.perf_counter() - start)
            metrics.write(json.dumps({"kind": "train", "loss": loss, "tok_per_s": rate}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1M shapes")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--only", choices=["step", "generator", "loop"])
    parser.add_argument("--baseline", metavar="COMMIT", help="compare Trainers with this commit")
    parser.add_argument("--preset", default="tiny", help="--baseline: the preset to train")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="--baseline: a bench shape instead")
    parser.add_argument("--batch", type=int, default=2, help="--baseline --shape: batch size")
    parser.add_argument("--seq", type=int, default=256, help="--baseline --shape: sequence length")
    parser.add_argument("--steps", type=int, default=5, help="--baseline: steps per rep")
    parser.add_argument(
        "--commands", action="store_true", help="--baseline: whole `appleslm train` runs"
    )
    parser.add_argument(
        "--anchor",
        choices=["llama"],
        help="--commands: against a plain one-process loop around llama.Model instead",
    )
    parser.add_argument("--llama-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_child:
        llama_child(args)
        return
    if args.commands and (args.baseline or args.anchor):
        print(f"BLAS: {blas_in_use()}")
        bench_commands(args)
        return
    if args.baseline:
        print(f"BLAS: {blas_in_use()}")
        bench_baseline(args)
        return
    shape = SHAPES["1m" if args.quick else "10m"]
    dtype = getattr(mx, args.dtype)
    batch_size, seq_len = (8, 128) if args.quick else (2, 256)
    print(f"BLAS: {blas_in_use()}; dtype {args.dtype}; batch {batch_size} x {seq_len}")
    for name, fn in (("step", bench_step), ("generator", bench_generator), ("loop", bench_loop)):
        if args.only in (None, name):
            fn(shape, dtype, batch_size, seq_len, args.reps)


if __name__ == "__main__":
    main()
