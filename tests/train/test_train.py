"""Pretraining end to end, through the real CLI: resume after SIGKILL, Ctrl-C, divergence,
data parallel, and the saved model."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from appleslm.io.files import read_provenance
from appleslm.io.model_dir import load_model
from appleslm.train.checkpoint import latest_checkpoint
from appleslm.train.launch import data_parallel_procs
from tests.helpers import assert_same_run, final_weights, run_on_two_ranks, train_losses

APPLESLM = [sys.executable, "-m", "appleslm"]


def train(config: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*APPLESLM, "train", str(config), "--out", str(out), "--no-progress", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def start(config: Path, out: Path, *args: str) -> subprocess.Popen:
    cmd = [*APPLESLM, "train", str(config), "--out", str(out), "--no-progress", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and max(train_losses(run), default=0) >= step:
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.01)
    raise AssertionError(f"run did not reach step {step}")


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {
            "model": {
                "embedding": "leviathan",
                "tie_word_embeddings": False,
                "layer_repeat": 2,
                "generator_d_seed": 16,
                "generator_heads": 2,
                "generator_rank": 4,
            },
            "grad_accum": 2,
        },
    ],
)
def test_resume_after_sigkill_equals_an_uninterrupted_run(variant, tmp_path, write_config):
    config = write_config(
        variant.get("model"), **{k: v for k, v in variant.items() if k != "model"}
    )
    train(config, tmp_path / "whole")

    process = start(config, tmp_path / "killed")
    wait_for_step(tmp_path / "killed", 13, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()
    resumed = train(config, tmp_path / "killed", "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr

    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "whole")
    whole, killed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert whole.keys() == killed.keys()
    for name in whole:
        assert mx.array_equal(whole[name], killed[name]).item(), name


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, write_config):
    config = write_config(steps=100000, save_every=100000)
    process = start(config, tmp_path / "run")
    wait_for_step(tmp_path / "run", 3, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.step >= 3
    assert f"stopped at step {checkpoint.step}" in output
    assert max(train_losses(tmp_path / "run")) == checkpoint.step


def test_divergence_stops_without_touching_the_last_good_checkpoint(tmp_path, write_config):
    # Good checkpoints first, then the run continued at a rate that blows it up. (At such a rate
    # from step 0 the first update is already the blow-up, and no checkpoint is good.)
    train(write_config(steps=3, save_every=1), tmp_path / "run")
    config = write_config(steps=10, lr=1e4, warmup_steps=0, save_every=1, grad_clip=1e9)
    done = train(config, tmp_path / "run", "--resume", check=False)
    assert done.returncode == 2
    assert "diverged" in done.stderr and "last good checkpoint" in done.stderr
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None
    saved = mx.load(str(checkpoint.path / "model.safetensors"))
    assert all(mx.isfinite(w).all().item() for w in saved.values())
    assert max(train_losses(tmp_path / "run")) == checkpoint.step


def test_a_run_directory_is_not_overwritten_without_resume(tmp_path, write_config):
    config = write_config(steps=2)
    train(config, tmp_path / "run")
    stamp = (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns
    # The same command again (the README's quick start, re-run) trains nothing and says so.
    done = train(config, tmp_path / "run")
    assert "already holds this finished run" in done.stdout + done.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    longer = write_config(steps=4)
    done = train(longer, tmp_path / "run", check=False)
    assert done.returncode == 2 and "--resume" in done.stderr
    other = write_config({"hidden_size": 64}, steps=2)
    done = train(other, tmp_path / "run", "--resume", check=False)
    assert done.returncode == 2 and "model config differs" in done.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_log_shows_library_paths_only_with_verbose(tmp_path, write_config):
    config = write_config(steps=2)

    def blas_line(*args: str) -> str:
        done = train(config, tmp_path / f"run{len(args)}", *args)
        return next(x for x in (done.stdout + done.stderr).splitlines() if "BLAS:" in x)

    plain = blas_line().split("BLAS: ")[1].split(";")[0]
    assert "/" not in plain
    if plain == "OpenBLAS":
        assert "BLAS: OpenBLAS (/" in blas_line("--verbose")


def test_the_first_evaluation_is_announced_with_its_size(tmp_path, write_config):
    done = train(write_config(steps=4, eval_every=2), tmp_path / "run")
    lines = (done.stdout + done.stderr).splitlines()
    notices = [i for i, line in enumerate(lines) if line.startswith("evaluating on")]
    results = [i for i, line in enumerate(lines) if line.startswith("step ") and "loss" in line]
    # eval_batches 2 x batch 4 x seq_len 32: announced once, before the first of two results
    assert [lines[i] for i in notices] == ["evaluating on 256 held-out tokens..."]
    assert len(results) == 2 and notices[0] < results[0]


def test_trained_model_loads_everywhere_and_beats_chance(tmp_path, write_config, corpus_dir):
    config = write_config(steps=30)
    done = train(config, tmp_path / "run")
    model_dir = tmp_path / "run" / "model"
    provenance = read_provenance(model_dir)
    assert provenance.quality.loss < math.log(512) - 0.5  # well below a uniform guess
    assert f"perplexity {provenance.quality.ppl:.2f}" in done.stdout
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model, tokenizer = load_model(model_dir)
    assert model.args.vocab_size == 512
    evaluated = subprocess.run(
        [*APPLESLM, "eval", str(model_dir), "--data", str(corpus_dir / "000.txt"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(evaluated.stdout)
    assert result.keys() >= {"loss", "ppl", "tokens"} and result["tokens"] > 1000
    assert math.isclose(result["ppl"], math.exp(result["loss"]), rel_tol=1e-9)
    # Bits per byte is recorded beside the loss, so density can fit it: bits per nat over bytes
    # per token of the held-out text, which English text of this corpus shares within a few %.
    recorded = provenance.quality.bpb / provenance.quality.loss
    assert math.isclose(recorded, result["bpb"] / result["loss"], rel_tol=0.1)


def test_data_parallel_ranks_match_a_single_process_run(tmp_path, write_config):
    """On the CPU `train` runs one rank per core by default (two on a one-core machine here, so
    the test always tests something); the global batch is split, the run is the same."""
    config = write_config(steps=6, eval_every=6, save_every=6)
    train(config, tmp_path / "single", "--procs", "1")
    procs = data_parallel_procs(None, batch_size=4, grad_accum=1)
    default = [] if procs > 1 else ["--procs", "2"]
    done = train(config, tmp_path / "dp", *default)
    output = done.stdout + done.stderr
    assert f"{max(procs, 2)} ranks in sync" in output and "Traceback" not in output
    assert_same_run(tmp_path / "single", tmp_path / "dp")
    # The path to other machines (mlx.launch) reaches the same run: its ranks start no ranks.
    output = run_on_two_ranks(
        [*APPLESLM, "train", str(config), "--out", str(tmp_path / "launched"), "--no-progress"]
    )
    assert "2 process(es)" in output
    assert_same_run(tmp_path / "single", tmp_path / "launched")


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of a launcher's child that runs data-parallel rank `rank` (Linux's /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"MLX_RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_a_failing_rank_ends_the_run_with_its_message(tmp_path, write_config):
    config = write_config(steps=200, save_every=2, eval_every=1000)
    process = start(config, tmp_path / "run", "--procs", "2")
    wait_for_step(tmp_path / "run", 5, process)
    other = rank_pid(process.pid, 1)
    assert other is not None
    os.kill(other, signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "data-parallel rank 1 was killed by SIGKILL" in output and "--resume" in output
    assert "Traceback" not in output
    assert rank_pid(process.pid, 0) is None  # rank 0 went with it, not left waiting
    # What it saved is sound: the run resumes and finishes.
    resumed = train(config, tmp_path / "run", "--resume", "--procs", "2", "--steps", "12")
    assert "2 ranks in sync" in resumed.stdout + resumed.stderr


def test_init_from_continues_from_a_models_weights(trained_model_dir, write_config, tmp_path):
    from appleslm.cli import main

    start = str(trained_model_dir)
    config = write_config(steps=1, lr=1e-12, warmup_steps=0, eval_every=1, eval_batches=1)
    argv = ["train", str(config), "--out", str(tmp_path / "run"), "--no-progress", "--procs", "1"]
    assert main([*argv, f"train.init_from={start}"]) == 2  # without its tokenizer: refused
    assert main([*argv, f"train.init_from={start}", f"data.tokenizer={start}"]) == 0
    before, after = final_weights(tmp_path / "run"), mx.load(str(Path(start) / "model.safetensors"))
    assert all(mx.allclose(before[k], after[k], atol=1e-6).item() for k in after)
    wide = write_config({"hidden_size": 64}, steps=1)
    argv = ["train", str(wide), "--out", str(tmp_path / "wide"), "--no-progress", "--procs", "1"]
    assert main([*argv, f"train.init_from={start}", f"data.tokenizer={start}"]) == 2
