"""Sweeps: resumable run by run, never retraining a finished run, safe across invocations."""

import os
import signal
import socket
import subprocess
import sys
import time

import mlx.core as mx
import pytest
import yaml

from appleslm.config import ConfigError
from appleslm.train.sweep import load_sweep, run_sweep


@pytest.fixture
def sweep_file(tmp_path, write_config):
    base = write_config(steps=12, eval_every=12, save_every=4)
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "out": str(tmp_path / "runs"),
                "runs": {
                    "dense-a": {"model": {"hidden_size": 32}},
                    "dense-b": {
                        "model": {
                            "hidden_size": 48,
                            "num_attention_heads": 3,
                            "num_key_value_heads": 1,
                        }
                    },
                },
            }
        )
    )
    return path


def test_a_sweep_killed_between_runs_resumes_without_retraining(sweep_file, tmp_path):
    cmd = [sys.executable, "-m", "appleslm", "sweep", str(sweep_file), "--no-progress"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finished_a = tmp_path / "runs" / "dense-a" / "model" / "model.safetensors"
    deadline = time.monotonic() + 180
    while not finished_a.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    stamp = finished_a.stat().st_mtime_ns

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dense-a: finished, skipping" in done.stdout
    assert "2 of 2 runs finished" in done.stdout
    assert finished_a.stat().st_mtime_ns == stamp  # not retrained
    runs = load_sweep(sweep_file)
    assert all(r.finished for r in runs)
    # Identical data, tokens and schedule for every run of the ladder.
    assert runs[0].config.data == runs[1].config.data
    assert runs[0].config.train == runs[1].config.train
    assert runs[1].config.model.hidden_size == 48


def test_a_run_locked_by_a_live_invocation_is_left_alone(sweep_file, tmp_path):
    lock = tmp_path / "runs" / "dense-a" / ".sweep.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{socket.gethostname()} {os.getppid()}\n")
    said = []
    run_sweep(sweep_file, only=["dense-a"], progress=False, log=said.append)
    assert any("locked by another invocation" in line for line in said)
    assert not (tmp_path / "runs" / "dense-a" / "model").exists()


def test_bad_sweep_files_are_refused(tmp_path, sweep_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nrunz: {}\n")
    with pytest.raises(ConfigError, match="unknown"):
        load_sweep(bad)
    bad.write_text("base: tiny\nruns: {x: {model: {hidden_sise: 3}}}\n")
    with pytest.raises(ConfigError, match="hidden_sise"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="no run"):
        run_sweep(sweep_file, only=["nope"], progress=False)


def test_seeds_expand_each_run_and_only_its_name_covers_them(sweep_file, tmp_path):
    spec = yaml.safe_load(sweep_file.read_text())
    spec["seeds"] = [0, 7]
    sweep_file.write_text(yaml.safe_dump(spec))
    runs = load_sweep(sweep_file)
    assert [r.name for r in runs] == [
        "dense-a-seed0",
        "dense-a-seed7",
        "dense-b-seed0",
        "dense-b-seed7",
    ]
    assert [r.config.train.seed for r in runs] == [0, 7, 0, 7]
    assert runs[0].config.data == runs[1].config.data  # same held-out split for every seed
    run_sweep(sweep_file, only=["dense-a"], procs=1, progress=False, log=lambda _: None)
    trained = load_sweep(sweep_file)
    assert [r.finished for r in trained] == [True, True, False, False]
    weights = [
        mx.load(str(r.run_dir / "model" / "model.safetensors"))["embed_tokens.weight"]
        for r in trained[:2]
    ]
    assert not mx.array_equal(weights[0], weights[1])  # the seed reached the initialisation
    for seeds in ("[]", "[1, 1]", "[-1]", "3", "[true]"):
        spec["seeds"] = yaml.safe_load(seeds)
        sweep_file.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match="seeds"):
            load_sweep(sweep_file)


def test_a_runs_own_seeds_replace_the_files(sweep_file):
    spec = yaml.safe_load(sweep_file.read_text())
    spec["seeds"] = [0]
    spec["runs"]["dense-b"]["seeds"] = [0, 1, 2]
    sweep_file.write_text(yaml.safe_dump(spec))
    runs = load_sweep(sweep_file)
    assert [(r.name, r.base_name, r.config.train.seed) for r in runs] == [
        ("dense-a-seed0", "dense-a", 0),
        ("dense-b-seed0", "dense-b", 0),
        ("dense-b-seed1", "dense-b", 1),
        ("dense-b-seed2", "dense-b", 2),
    ]
    assert runs[1].config.model == runs[3].config.model
    del spec["seeds"]  # without the file's seeds the other runs stay unseeded
    sweep_file.write_text(yaml.safe_dump(spec))
    assert [r.name for r in load_sweep(sweep_file)][0] == "dense-a"
    spec["runs"]["dense-b"]["seeds"] = [3, 3]
    sweep_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="dense-b: seeds must be"):
        load_sweep(sweep_file)
    spec["runs"]["dense-b"] = [{"model": {}}]
    sweep_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="run 'dense-b' must be sections"):
        load_sweep(sweep_file)


def test_a_long_finished_study_is_measured_by_its_folder(sweep_file, tmp_path, capsys):
    from appleslm.cli import main

    spec = yaml.safe_load(sweep_file.read_text())
    spec["seeds"] = [0, 1, 2, 3]  # 8 runs
    sweep_file.write_text(yaml.safe_dump(spec))
    for run in load_sweep(sweep_file):  # finished as an exported study is: results, no weights
        (run.run_dir / "model").mkdir(parents=True)
        (run.run_dir / "model" / "appleslm.json").write_text("{}")
        (run.run_dir / "config.yaml").write_text("{}")
    main(["sweep", str(sweep_file)])
    out = capsys.readouterr().out
    assert "8 of 8 runs finished" in out and out.count("finished, skipping") == 8
    assert out.rstrip().endswith(f"density {tmp_path / 'runs'}/*")
