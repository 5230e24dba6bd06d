"""Effective size and density against a dense ladder: the fits, their refusals, and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from appleslm.cli import main
from appleslm.density import (
    DensingFit,
    DensityError,
    PowerLawFit,
    density_report,
    fit_densing,
    fit_power_law,
    format_table,
    load_runs,
)

A, ALPHA, B = 400.0, 0.3, 1.8  # a plausible small-LM curve: ~3.8 nats at 1M params, ~2.4 at 100M
SIZES = np.geomspace(1e6, 1e8, 5)


def curve(n):
    return A * np.asarray(n, dtype=float) ** -ALPHA + B


# The tiny experiment's dense ladder (leviathan-tiny-experiment.md): loss *rises* with N.
TINY_N = [0.709e6, 1.294e6, 2.156e6, 4.722e6]
TINY_L = [5.261, 5.378, 5.517, 5.665]


# ------------------------------------------------------------------ L(N) = a N^-alpha + b


def test_power_law_recovers_noiseless_parameters():
    fit = fit_power_law(SIZES, curve(SIZES))
    assert fit.a == pytest.approx(A, rel=1e-6)
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert fit.b == pytest.approx(B, rel=1e-6)
    assert fit.residual_rms < 1e-9
    assert fit.n_points == 5 and not fit.floor_at_zero
    assert fit.predict(1e7) == pytest.approx(curve(1e7), rel=1e-9)


def test_power_law_recovers_noisy_parameters_within_their_errors():
    rng = np.random.default_rng(0)
    sizes = np.geomspace(1e6, 1e8, 8)
    fit = fit_power_law(sizes, curve(sizes) + rng.normal(0.0, 0.005, sizes.size))
    a_std, alpha_std, b_std = fit.std
    assert fit.alpha == pytest.approx(ALPHA, abs=0.03)
    assert fit.b == pytest.approx(B, abs=0.05)
    assert fit.a == pytest.approx(A, rel=0.15)
    # The reported errors are honest: within 4 sigma, and not absurdly wide.
    assert abs(fit.alpha - ALPHA) < 4 * alpha_std < 0.1
    assert abs(fit.b - B) < 4 * b_std
    assert fit.cov.shape == (3, 3)
    assert 0.001 < fit.residual_rms < 0.01


def test_effective_params_of_a_dense_point_is_its_own_size():
    losses = curve(SIZES)
    fit = fit_power_law(SIZES, losses)
    for n, loss in zip(SIZES, losses, strict=True):
        value, lo, hi = fit.effective_params_interval(loss)
        assert value == pytest.approx(n, rel=1e-8)
        assert lo <= value <= hi


def test_effective_params_of_a_noisy_dense_point_is_its_size_within_fit_error():
    rng = np.random.default_rng(1)
    sizes = np.geomspace(1e6, 1e8, 6)
    losses = curve(sizes) + rng.normal(0.0, 0.003, sizes.size)
    fit = fit_power_law(sizes, losses)
    for n, loss in zip(sizes, losses, strict=True):
        # The point's own noise moves it along the curve, so include it in the range.
        value, lo, hi = fit.effective_params_interval(loss, z=4.0, loss_std=0.003)
        assert lo <= n <= hi
        assert value == pytest.approx(n, rel=0.15)


def test_effective_params_interval_matches_monte_carlo_spread():
    """The delta-method range agrees with the scatter of N_eff over repeated noisy ladders."""
    rng = np.random.default_rng(2)
    sizes = np.geomspace(1e6, 1e8, 6)
    target = float(curve(2e7))
    logs, predicted = [], []
    for _ in range(100):
        fit = fit_power_law(sizes, curve(sizes) + rng.normal(0.0, 0.01, sizes.size))
        value, _, hi = fit.effective_params_interval(target)
        logs.append(math.log(value))
        predicted.append(math.log(hi / value))
    assert np.median(predicted) == pytest.approx(np.std(logs), rel=0.35)


def test_a_better_variant_has_density_above_one():
    fit = fit_power_law(SIZES, curve(SIZES))
    # The variant reaches the loss of a dense model twice its size.
    n_eff = fit.effective_params(curve(2.0 * 1e7))
    assert n_eff / 1e7 == pytest.approx(2.0, rel=1e-8)


def test_refuses_fewer_than_four_points():
    with pytest.raises(DensityError, match="at least 4"):
        fit_power_law(SIZES[:3], curve(SIZES[:3]))


def test_refuses_the_tiny_experiment_where_loss_rises_with_n():
    with pytest.raises(DensityError, match="does not fall with N.*undertrained"):
        fit_power_law(TINY_N, TINY_L)


def test_refuses_degenerate_ladders():
    # Barely falling and noisy: the best curve is a line in log N (alpha -> 0).
    with pytest.raises(DensityError, match="alpha ran to 0"):
        fit_power_law(SIZES, [3.0, 2.99, 3.0, 2.99, 2.985])
    # One drop, then flat: a step, not a scaling law (alpha -> its upper bound).
    with pytest.raises(DensityError, match="alpha ran to its upper bound"):
        fit_power_law(SIZES, [3.0, 2.9, 2.91, 2.9, 2.9])


def test_refuses_non_finite_and_non_positive_inputs():
    with pytest.raises(DensityError, match="non-finite"):
        fit_power_law(SIZES, [3.0, 2.9, float("nan"), 2.7, 2.6])
    with pytest.raises(DensityError, match="positive"):
        fit_power_law([0, 1e6, 1e7, 1e8], [3.0, 2.9, 2.8, 2.7])


def test_refuses_a_loss_below_the_fitted_floor():
    fit = fit_power_law(SIZES, curve(SIZES))
    with pytest.raises(DensityError, match="below the fitted floor"):
        fit.effective_params(B - 0.01)
    with pytest.raises(DensityError, match="below the fitted floor"):
        fit.effective_params(fit.b)


def test_floor_is_pinned_at_zero_when_it_would_go_negative():
    losses = 40.0 * SIZES**-0.1 - 0.3  # the unconstrained floor is negative
    fit = fit_power_law(SIZES, losses)
    assert fit.b == 0.0 and fit.floor_at_zero
    assert fit.std[2] == 0.0 and fit.std[1] > 0.0
    assert fit.effective_params(losses[2]) == pytest.approx(SIZES[2], rel=0.05)


# ------------------------------------------------------------------ L = a N^-alpha + b D^-beta


def densing_grid(irreducible: float = 0.0):
    n, d = np.meshgrid(np.geomspace(1e6, 1e8, 4), np.geomspace(1e8, 1e10, 4))
    n, d = n.ravel(), d.ravel()
    return n, d, 406.4 * n**-0.34 + 410.7 * d**-0.28 + irreducible


def test_densing_recovers_known_parameters():
    n, d, loss = densing_grid()
    fit = fit_densing(n, d, loss)
    assert isinstance(fit, DensingFit)
    assert (fit.a, fit.alpha, fit.b, fit.beta) == pytest.approx(
        (406.4, 0.34, 410.7, 0.28), rel=1e-5
    )
    assert fit.effective_params(loss[5], d[5]) == pytest.approx(n[5], rel=1e-6)


def test_densing_with_irreducible_term_recovers_it():
    n, d, loss = densing_grid(irreducible=1.69)
    fit = fit_densing(n, d, loss, irreducible=True)
    assert fit.e == pytest.approx(1.69, rel=1e-4)
    assert fit.alpha == pytest.approx(0.34, rel=1e-4)
    assert fit.cov.shape == (5, 5)


def test_densing_refuses_too_few_distinct_token_counts():
    n, d, loss = densing_grid()
    keep = d <= np.unique(d)[1]  # two token counts
    with pytest.raises(DensityError, match="at least 3 of each"):
        fit_densing(n[keep], d[keep], loss[keep])


# ------------------------------------------------------------------ runs on disk and the report


def write_run(root, name, variant, params, loss, tokens=1_000_000, as_model_dir=False):
    run = root / name
    model = run if as_model_dir else run / "model"
    model.mkdir(parents=True)
    meta = {
        "name": name,
        "variant": variant,
        "params": {"params_total": int(params), "params_non_embedding": int(params * 0.6)},
        "val_loss": float(loss),
        "tokens_seen": int(tokens),
    }
    (model / "appleslm.json").write_text(json.dumps(meta))
    return run


@pytest.fixture
def ladder_dirs(tmp_path):
    dirs = [
        write_run(tmp_path, f"dense-{i}", "dense", n, curve(n)) for i, n in enumerate(SIZES[:4])
    ]
    dirs.append(write_run(tmp_path, "lev", "leviathan", 1e7, curve(2.0e7), as_model_dir=True))
    dirs.append(write_run(tmp_path, "ls", "ls", 3e6, curve(4.5e6)))
    return dirs


def test_load_runs_reads_run_and_model_dirs(ladder_dirs):
    runs = load_runs(ladder_dirs)
    assert [r.variant for r in runs] == ["dense"] * 4 + ["leviathan", "ls"]
    assert runs[4].name == "lev" and runs[4].n_params() == 10_000_000
    with pytest.raises(DensityError, match="no parameter count"):
        runs[0].n_params("params_nope")


def test_report_json_table_and_plot(ladder_dirs, tmp_path):
    plot = tmp_path / "out" / "density.png"
    report = density_report(ladder_dirs, plot_path=plot)
    json.dumps(report, allow_nan=False)  # serialisable, no inf/NaN
    assert report["fit"]["alpha"] == pytest.approx(ALPHA, rel=1e-5)
    assert report["fit"]["ladder"] == [f"dense-{i}" for i in range(4)]
    by_name = {r["name"]: r for r in report["runs"]}
    for row in report["runs"]:
        for key in ("params", "loss", "effective_params", "density"):
            assert key in row
    assert by_name["lev"]["density"] == pytest.approx(2.0, rel=1e-5)
    assert by_name["ls"]["density"] == pytest.approx(1.5, rel=1e-5)
    assert by_name["dense-1"]["density"] == pytest.approx(1.0, rel=1e-6)
    assert by_name["lev"]["ladder"] is False and by_name["dense-0"]["ladder"] is True

    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024
    table = format_table(report)
    assert "lev" in table and "2.00x" in table and "alpha" in table


def test_report_uses_the_chosen_params_key_and_ladder(ladder_dirs):
    report = density_report(ladder_dirs, params_key="params_non_embedding")
    lev = next(r for r in report["runs"] if r["name"] == "lev")
    assert lev["params"] == 6_000_000
    named = density_report(ladder_dirs, ladder=["dense-0", "dense-1", "dense-2", "dense-3"])
    assert named["fit"]["n_points"] == 4
    with pytest.raises(DensityError, match="not among"):
        density_report(ladder_dirs, ladder=["dense-0", "ghost"])


def test_report_refuses_few_dense_runs(ladder_dirs):
    with pytest.raises(DensityError, match="found 3 dense ladder run"):
        density_report(ladder_dirs[1:])


def test_report_refuses_a_run_below_the_floor(ladder_dirs, tmp_path):
    ladder_dirs.append(write_run(tmp_path, "magic", "leviathan", 1e7, B - 0.1))
    with pytest.raises(DensityError, match="'magic'.*below the fitted floor"):
        density_report(ladder_dirs)


def test_report_densing(tmp_path):
    n, d, loss = densing_grid()
    dirs = [
        write_run(tmp_path, f"dense-{i}", "dense", ni, li, tokens=di)
        for i, (ni, di, li) in enumerate(zip(n, d, loss, strict=True))
    ]
    target = 406.4 * 3e7**-0.34 + 410.7 * 1e9**-0.28
    dirs.append(write_run(tmp_path, "lev", "leviathan", 1e7, target, tokens=1e9))
    report = density_report(dirs, plot_path=tmp_path / "densing.png", densing=True)
    lev = next(r for r in report["runs"] if r["name"] == "lev")
    assert lev["density"] == pytest.approx(3.0, rel=1e-4)
    assert report["fit"]["form"] == "a*N^-alpha + b*D^-beta"
    assert (tmp_path / "densing.png").stat().st_size > 1024
    # Without --densing, a ladder of mixed tokens is flagged.
    plain = density_report(dirs[:16:5] + dirs[-1:])
    assert any("token counts" in w for w in plain["warnings"])


def test_cli_json_and_refusal(ladder_dirs, tmp_path, capsys):
    assert (
        main(["density", *map(str, ladder_dirs), "--json", "--plot", str(tmp_path / "p.png")]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in out["runs"]} >= {"lev", "ls"}
    assert (tmp_path / "p.png").exists()

    assert main(["density", *map(str, ladder_dirs[2:]), "--no-plot"]) == 2
    assert "at least 4" in capsys.readouterr().err


def test_power_law_fit_is_a_plain_dataclass():
    fit = PowerLawFit(a=A, alpha=ALPHA, b=B, cov=None, residual_rms=0.0, n_points=4)
    assert fit.effective_params(curve(5e6)) == pytest.approx(5e6, rel=1e-10)
    value, lo, hi = fit.effective_params_interval(curve(5e6))
    assert math.isnan(lo) and math.isnan(hi)


def test_seeds_are_pooled_into_their_mean_and_spread(tmp_path):
    spread = 0.02
    dirs = []
    for i, n in enumerate(SIZES[:4]):
        offsets = (0.0,) if i == 3 else (-spread, 0.0, spread)  # one seed: still named by its stem
        for k, offset in enumerate(offsets):
            dirs.append(write_run(tmp_path, f"dense-{i}-seed{k}", "dense", n, curve(n) + offset))
    single = write_run(tmp_path, "lev", "leviathan", 1e7, curve(2.0e7))
    alone = {r["name"]: r for r in density_report([*dirs, single])["runs"]}["lev"]
    for k, offset in enumerate((-spread, 0.0, spread)):
        dirs.append(write_run(tmp_path, f"lev-seed{k}", "leviathan", 1e7, curve(2.0e7) + offset))
    report = density_report(dirs)
    rows = {r["name"]: r for r in report["runs"]}
    assert list(rows) == ["dense-0", "dense-1", "dense-2", "dense-3", "lev"]
    assert report["fit"]["alpha"] == pytest.approx(ALPHA, rel=1e-5)  # fitted on the means
    assert rows["dense-3"]["seeds"] == 1 and rows["dense-2"]["seeds"] == 3
    lev = rows["lev"]
    assert lev["seeds"] == 3 and lev["loss_std"] == pytest.approx(spread)
    assert lev["loss"] == pytest.approx(curve(2.0e7)) and lev["density"] == pytest.approx(2.0)
    # the spread of the seeds widens the range around the same N_eff
    assert lev["effective_params_lo"] < alone["effective_params_lo"]
    assert lev["effective_params_hi"] > alone["effective_params_hi"]
    assert "± 0.0200 (3)" in format_table(report)
    dirs.append(write_run(tmp_path, "lev-seed3", "leviathan", 2e7, curve(2.0e7)))
    with pytest.raises(DensityError, match="seeds of 'lev' are not the same model"):
        density_report(dirs)
