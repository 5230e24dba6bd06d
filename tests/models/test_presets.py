"""The STLM and Mixtral presets and sweep runs build, with the counts their comments state."""

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
