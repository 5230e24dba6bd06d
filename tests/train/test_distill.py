"""Distillation: the loss against a hand computation, and a distillation run through the CLI
that resumes after SIGKILL exactly as if it had never stopped."""

from __future__ import annotations

import signal

import mlx.core as mx
import numpy as np
import pytest

from appleslm.cli import main
from appleslm.io.files import read_config, read_provenance
from appleslm.train.losses import distillation_loss
from tests.helpers import build_tiny, final_weights, train_losses
from tests.train.test_train import APPLESLM, wait_for_step


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.3)])
def test_the_loss_is_the_hand_computed_kl_and_cross_entropy(temperature, ce_weight):
    teacher, student = build_tiny(0), build_tiny(1)
    vocab = 250  # fewer than the models' 300 logits: the padding is never compared
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, vocab, (2, 7))
    targets = rng.integers(0, vocab, (2, 7))
    mask = np.ones((2, 7), dtype=np.float32)
    mask[1, 4:] = 0  # padding
    batch = {"inputs": mx.array(inputs), "targets": mx.array(targets), "mask": mx.array(mask)}
    total, count, aux = distillation_loss(teacher, vocab, temperature, ce_weight)(student, batch)

    t = np.array(teacher(batch["inputs"]))[..., :vocab].astype(np.float64)
    s = np.array(student(batch["inputs"]))[..., :vocab].astype(np.float64)
    p_log, q_log = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    ce = -np.take_along_axis(log_softmax(s), targets[..., None], -1)[..., 0]
    per_token = (1 - ce_weight) * temperature**2 * kl + ce_weight * ce
    assert count.item() == mask.sum() and aux == {}
    assert total.item() == pytest.approx((per_token * mask).sum(), rel=1e-5)


def test_a_student_is_at_zero_kl_only_when_it_is_the_teacher():
    teacher = build_tiny(0)
    batch = {"inputs": mx.array([[1, 2, 3, 4]]), "targets": mx.array([[2, 3, 4, 5]])}
    same, _, _ = distillation_loss(teacher, 300, 2.0, 0.0)(teacher, batch)
    other, _, _ = distillation_loss(teacher, 300, 2.0, 0.0)(build_tiny(1), batch)
    assert abs(same.item()) < 1e-5 and other.item() > 1e-3


def distill_cmd(teacher, config, out, *extra: str) -> list[str]:
    return [
        *APPLESLM, "distill", str(teacher), "--student", str(config), "--out", str(out),
        "--temperature", "2", "--ce-weight", "0.25", "--no-progress", "--procs", "1", *extra,
    ]  # fmt: skip


def test_a_distillation_resumes_after_sigkill_as_if_uninterrupted(
    trained_model_dir, write_config, tmp_path
):
    import subprocess

    config = write_config(steps=16, save_every=4, eval_every=8)
    whole = subprocess.run(
        distill_cmd(trained_model_dir, config, tmp_path / "whole"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "--draft" in whole.stdout

    process = subprocess.Popen(
        distill_cmd(trained_model_dir, config, tmp_path / "killed"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(tmp_path / "killed", 9, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed = subprocess.run(
        distill_cmd(trained_model_dir, config, tmp_path / "killed", "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "whole")
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)

    student = tmp_path / "whole" / "model"
    assert read_config(student)["vocab_size"] == read_config(trained_model_dir)["vocab_size"]
    assert (student / "tokenizer.json").read_bytes() == (
        trained_model_dir / "tokenizer.json"
    ).read_bytes()
    stage = read_provenance(student).training[-1]
    assert stage.task == "distillation" and stage.teacher == "micro"
    assert "teacher: micro" in (student / "README.md").read_text()


def test_distillation_refuses_what_cannot_work(trained_model_dir, write_config, tmp_path, capsys):
    config = write_config(steps=2)
    for extra, names in [
        (["--temperature", "0"], "temperature"),
        (["--ce-weight", "1.5"], "ce_weight"),
        (["data.tokenizer=x"], "teacher's tokenizer"),
        (["model.head=bytes"], "head"),
    ]:
        argv = ["distill", str(trained_model_dir), "--student", str(config)]
        out = ["--out", str(tmp_path / "run"), "--no-progress", "--procs", "1"]
        assert main([*argv, *out, *extra]) == 2
        err = capsys.readouterr().err
        assert names in err and "Traceback" not in err, err
    assert main(["distill", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "no such model directory" in capsys.readouterr().err
