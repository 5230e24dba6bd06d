"""The STLM and Mixtral presets and sweep runs build, with the counts their comments state."""

from dataclasses import replace
from pathlib import Path

import pytest

from appleslm.config import load_config, preset_dir
from appleslm.models import Model, parameter_counts
from appleslm.train.sweep import load_sweep


def sweep_runs(name: str) -> list:
    return load_sweep(Path(str(preset_dir() / "sweeps" / name)))


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
    runs = sweep_runs("architectures.yaml")
    ladder = sweep_runs("density.yaml")
    assert {r.run_dir.parent for r in runs} == {ladder[0].run_dir.parent}
    dense = next(r for r in ladder if r.name == "dense-d96x6").config
    for run in runs:
        counts = parameter_counts(Model(run.config.model))
        assert run.config.data == dense.data and run.config.train == dense.train, run.name
        assert counts["params_active"] <= counts["params_total"]
    moe = parameter_counts(Model(next(r for r in runs if r.name == "moe-d96x6").config.model))
    assert moe["params_active"] < moe["params_total"]


def study(name: str) -> dict:
    return {r.base_name: r for r in sweep_runs(name)}


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
    # the 6e-3 families have 3 seeds, the rest of the check one
    seeds = {}
    for run in sweep_runs("density-lr.yaml"):
        seeds.setdefault(run.base_name, []).append(run.config.train.seed)
    best = {f"{f}-d64x4-3m-lr6e-3" for f in ("dense", "untied", "ls", "moe", "leviathan")}
    best |= {f"dense-d{s}-3m-lr6e-3" for s in ("32x4", "48x4", "96x6")}
    assert {name for name, k in seeds.items() if k == [0, 1, 2]} == best
    assert all(k == [0] for name, k in seeds.items() if name not in best)
    for run in study("density-mac.yaml").values():
        assert parameter_counts(Model(run.config.model))["params_total"] > 0


def test_the_vocabulary_check_has_the_table_shares_its_comment_states():
    runs = {name: run.config for name, run in study("density-vocab.yaml").items()}
    study_runs = study("density-study.yaml")

    def total(config) -> int:
        return parameter_counts(Model(config))["params_total"]

    def share(config) -> float:
        return config.vocab_size * config.hidden_size / total(config)

    shares = {v: round(100 * share(runs[f"dense-d64x4-v{v}"].model)) for v in (512, 8192)}
    assert shares == {512: 15, 8192: 74}
    assert round(100 * share(study_runs["dense-d64x4-3m"].config.model)) == 41
    # the byte embedder is twice the V = 512 table, a seventh of the V = 8192 one
    bytes_in, dense = runs["bytes-in-d64x4-v8192"].model, runs["dense-d64x4-v8192"].model
    embedder = total(bytes_in) - total(dense)
    assert round(embedder / 1e3) == 74
    for name, config in runs.items():  # the study's bodies and schedule at 6e-3
        vocab = name.rpartition("-v")[2]
        assert config.model.vocab_size == int(vocab), name
        twin = study_runs[name.rpartition("-v")[0] + "-3m"].config
        assert replace(config.model, vocab_size=twin.model.vocab_size) == twin.model, name
        assert config.train == replace(twin.train, lr=6e-3, seed=config.train.seed), name
