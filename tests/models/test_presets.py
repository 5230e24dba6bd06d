"""The STLM and Mixtral presets and sweep runs build, with the counts their comments state."""

from dataclasses import replace
from pathlib import Path

import pytest

from appleslm.config import load_config, preset_dir
from appleslm.models import Model, parameter_counts
from appleslm.train.sweep import load_sweep


def info(preset: str) -> dict:
    return parameter_counts(Model(load_config(preset).model))  # shapes only


@pytest.mark.parametrize(
    "preset, total, active",
    [
        ("stlm-50m", 55.89, 55.89),
        ("stlm-50m-bytes", 32.72, 32.72),
        ("stlm-50m-ffn-sharing", 15.42, 15.42),
        ("tiny-moe", 1.74, 1.15),
        ("tiny-bytes", 1.53, 1.53),
        ("tiny-share-ffn", 0.68, 0.68),
    ],
)
def test_presets_have_the_counts_their_comments_state(preset, total, active):
    counts = info(preset)
    assert round(counts["params_total"] / 1e6, 2) == total
    assert round(counts["params_active"] / 1e6, 2) == active


def test_architecture_sweep_runs_are_valid_models_beside_the_density_ladder():
    runs = load_sweep(Path(str(preset_dir() / "sweeps" / "architectures.yaml")))
    ladder = load_sweep(Path(str(preset_dir() / "sweeps" / "density.yaml")))
    assert {r.run_dir.parent for r in runs} == {ladder[0].run_dir.parent}
    dense = next(r for r in ladder if r.name == "dense-d96x6").config
    for run in runs:
        counts = parameter_counts(Model(run.config.model))
        assert run.config.data == dense.data and run.config.train == dense.train, run.name
        assert counts["params_active"] <= counts["params_total"]
    moe = parameter_counts(Model(next(r for r in runs if r.name == "moe-d96x6").config.model))
    assert moe["params_active"] < moe["params_total"]


def study(name: str) -> dict:
    return {r.base_name: r for r in load_sweep(Path(str(preset_dir() / "sweeps" / name)))}


def test_the_density_study_runs_have_the_sizes_and_budgets_its_comments_state():
    runs = study("density-study.yaml")
    stated = {  # thousands of parameters, total and active, as the file's comments give them
        "untied-d64x4-3m": (447, 447),
        "leviathan-d64x4-3m": (370, 370),
        "ls-d64x4-3m": (316, 316),
        "moe-d64x4-3m": (452, 317),
        "share-ffn-d64x4-3m": (215, 215),
        "wide-d96x2-3m": (320, 320),
        "leviathan-d64x6-3m": (463, 463),
    }
    for name, (total, active) in stated.items():
        counts = parameter_counts(Model(runs[name].config.model))
        assert (round(counts["params_total"] / 1e3), round(counts["params_active"] / 1e3)) == (
            total,
            active,
        ), name
    ladder = [runs[f"dense-d{shape}-3m"].config for shape in ("32x4", "48x4", "64x4", "96x6")]
    for name, run in runs.items():
        tokens = run.config.train.steps * run.config.train.batch_size * run.config.train.seq_len
        budget = {"0.5m": 512_000, "1m": 1_024_000, "3m": 3_072_000}[name.rpartition("-")[2]]
        assert tokens == budget, name
        assert run.config.data == ladder[0].data, name
        if name.endswith("-3m"):  # one schedule for every run of a budget
            assert run.config.train == ladder[0].train, name
    # the learning-rate check changes the rate of the study's runs and nothing else
    for name, run in study("density-lr.yaml").items():
        base, _, rate = name.rpartition("-lr")
        twin = runs[base].config
        assert run.config.model == twin.model and run.config.data == twin.data, name
        assert run.config.train.lr == float(rate) != twin.train.lr, name
    # the best-rate seeds are the learning-rate check's runs again, so that its seed 0 is reused
    check = study("density-lr.yaml")
    for name, run in study("density-best.yaml").items():
        twin = check[name].config
        train = replace(run.config.train, seed=twin.train.seed)  # the dict keeps one seed per run
        same = (run.config.model, run.config.data, train) == (twin.model, twin.data, twin.train)
        assert same, name
        assert run.run_dir.parent == check[name].run_dir.parent, name
    for name in ("density-vocab.yaml", "density-mac.yaml"):
        for run in study(name).values():
            assert parameter_counts(Model(run.config.model))["params_total"] > 0
