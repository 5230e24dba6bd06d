"""Training under faults: a diverging run, damaged checkpoints, a torn metrics file, a validation
split too small to measure, failed starts and refused resumes. In each, the run ends in a message
(exit 2) or recovers, and nothing good on disk is lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from appleslm.train.checkpoint import list_checkpoints
from tests.helpers import train_losses

APPLESLM = [sys.executable, "-m", "appleslm"]


def train(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [*APPLESLM, "train", str(config), "--out", str(out), "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_blown_up_update_is_never_saved_and_the_run_resumes_at_a_sane_rate(
    tmp_path, write_config
):
    run = tmp_path / "run"
    assert train(write_config(steps=4, save_every=2), run).returncode == 0
    good = list_checkpoints(run / "checkpoints")
    # Continued at an absurd rate, the first update blows the weights up (to finite values):
    # it must not become a checkpoint, nor push the good ones out of the rotation (keep 2).
    wild = write_config(steps=12, lr=1e6, warmup_steps=0, save_every=1, grad_clip=1e9)
    done = train(wild, run, "--resume")
    assert done.returncode == 2 and "the update moved the weights" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and f"{good[-1].path} (step 4)" in done.stderr
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [c.step for c in good]
    saved = mx.load(str(good[-1].path / "model.safetensors"))
    assert max(mx.abs(w).max().item() for w in saved.values()) < 10
    assert max(train_losses(run)) == 4  # nothing logged past the good state
    sane = write_config(steps=12, save_every=4)
    resumed = train(sane, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {good[-1].path}" in resumed.stdout + resumed.stderr


def test_a_diverging_first_step_says_no_checkpoint_was_written(tmp_path, write_config):
    done = train(write_config(lr=1e6, warmup_steps=0, save_every=1, grad_clip=1e9), tmp_path / "r")
    assert done.returncode == 2 and "No checkpoint was written" in done.stderr, done.stderr
    assert not list_checkpoints(tmp_path / "r" / "checkpoints")


def damage(checkpoint: Path, how: str) -> None:
    if how == "weights":
        path = checkpoint / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-500])
    elif how == "optimizer":
        path = checkpoint / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[:64])
    else:
        (checkpoint / "state.json").write_text("{garbage")


@pytest.mark.parametrize("how", ["weights", "optimizer", "state"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(
    how, tmp_path, write_config
):
    run = tmp_path / "run"
    config = write_config(steps=20, save_every=5, keep_checkpoints=3, eval_every=20)
    process = subprocess.Popen(
        [*APPLESLM, "train", str(config), "--out", str(run), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while len(list_checkpoints(run / "checkpoints")) < 3:
        assert process.poll() is None, process.stdout.read()
    process.kill()
    process.wait()
    checkpoints = list_checkpoints(run / "checkpoints")
    damage(checkpoints[-1].path, how)
    leftover = run / "checkpoints" / ".ckpt-00000099.abcdef"  # a write the kill interrupted
    leftover.mkdir()
    resumed = train(config, run, "--resume")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output
    assert f"checkpoint {checkpoints[-1].path} is damaged" in output
    assert f"resumed from {checkpoints[-2].path}" in output
    assert not leftover.exists() and "interrupted" in output


def test_a_torn_metrics_line_does_not_block_a_resume(tmp_path, write_config):
    run = tmp_path / "run"
    config = write_config(steps=6, save_every=3, eval_every=6)
    assert train(config, run).returncode == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # power lost mid-append
    longer = write_config(steps=9, save_every=3, eval_every=9)
    resumed = train(longer, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(train_losses(run)) == list(range(1, 10))  # the torn line is gone, all re-logged


def test_a_validation_split_too_small_is_found_before_the_first_step(tmp_path, write_config):
    text = tmp_path / "one.txt"  # one document: validation is its tail, here a few tokens
    text.write_text("The Congress shall have power to lay and collect taxes. " * 30)
    config = write_config(data={"source": str(text), "val_fraction": 0.01})
    done = train(config, tmp_path / "run")
    assert done.returncode == 2 and "validation" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_resume_of_an_empty_folder_says_it_starts_from_step_0(tmp_path, write_config):
    done = train(write_config(steps=2), tmp_path / "fresh", "--resume")
    assert done.returncode == 0 and "starting from step 0" in done.stdout + done.stderr


def test_a_failed_start_is_no_run_to_resume(tmp_path, write_config):
    bad = write_config(data={"source": str(tmp_path / "missing.txt")})
    failed = train(bad, tmp_path / "run")
    assert failed.returncode == 2 and "missing.txt" in failed.stderr
    assert train(write_config(steps=2), tmp_path / "run").returncode == 0  # no --resume needed


def test_a_refused_resume_leaves_the_run_record_as_it_was(tmp_path, write_config):
    run = tmp_path / "run"
    assert train(write_config(steps=4, save_every=2), run).returncode == 0
    before = (run / "config.yaml").read_bytes()
    other = write_config({"hidden_size": 64}, steps=8)
    refused = train(other, run, "--resume")
    assert refused.returncode == 2 and "model config differs" in refused.stderr
    assert (run / "config.yaml").read_bytes() == before
