import json
import subprocess
import sys

import numpy as np
import pytest

from slowrun.dataset import COMPARABLE, DatasetError, require_comparable
from slowrun.efficiency import Curve, EfficiencyError, check_same_data, fit_power_law, place, run_loss
from slowrun.results import ResultError


@pytest.mark.parametrize("loss,expected", [(3.195, 6.1), (2.987, 13.8), (3.402, 3.8)])
def test_fineweb_curve_matches_the_reference_figures(loss, expected):
    assert place(Curve.load("fineweb"), loss).efficiency == pytest.approx(expected, abs=0.05)


def test_piecewise_linear_in_tokens():
    c = Curve("t", 100, [100, 200, 400], {"val": [4.0, 3.0, 2.0]})
    assert place(c, 4.0).efficiency == 1.0
    assert place(c, 3.5).tokens == pytest.approx(150)
    assert place(c, 2.5).tokens == pytest.approx(300) and place(c, 2.5).efficiency == pytest.approx(3.0)
    # a non-monotone (noisy) curve is read as "best loss at <= D tokens"
    noisy = Curve("n", 100, [100, 200, 400], {"val": [4.0, 4.1, 3.0]})
    assert place(noisy, 3.5).tokens == pytest.approx(300)


def test_outside_the_curve_needs_extrapolate():
    c = Curve.load("fineweb")
    with pytest.raises(EfficiencyError, match="below the curve's range.*--extrapolate"):
        place(c, 2.8)
    with pytest.raises(EfficiencyError, match="above the curve's range"):
        place(c, 3.9)
    p = place(c, 2.85, extrapolate=True)
    assert p.extrapolated and p.efficiency > 20 and "EXTRAPOLATED" in p.describe()


def test_power_law_fit_recovers_parameters():
    D = np.array([1e5, 2e5, 4e5, 8e5, 1.6e6])
    y = 50.0 / D**0.3 + 2.5
    f = fit_power_law(D, y)
    assert f.alpha == pytest.approx(0.3, rel=0.05) and f.E == pytest.approx(2.5, abs=0.02)
    assert f.inverse(f(3e5)) == pytest.approx(3e5, rel=1e-6)


def test_bad_curves(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"name": "x", "budget": 10, "tokens": [10], "losses": {"val": [3.0]}}))
    with pytest.raises(EfficiencyError, match="at least two points"):
        Curve.load(str(p))
    with pytest.raises(EfficiencyError, match="curve not found"):
        Curve.load(str(tmp_path / "missing.json"))


def test_refuses_runs_on_other_data():
    c = Curve("t", 100, [100, 200], {"val": [4.0, 3.0]}, dataset={"tokenizer": "a", "val": "v1", "test": "t1"})
    check_same_data(c, {"tokenizer": "a", "val": "v1", "test": "t1", "train": "x"})  # a curve spans many train splits
    with pytest.raises(DatasetError, match="different val"):
        check_same_data(c, {"tokenizer": "a", "val": "v2", "test": "t1"})
    with pytest.raises(DatasetError, match="different tokenizer"):
        check_same_data(Curve.load("fineweb"), {"tokenizer": "sha256:abc"})
    with pytest.raises(DatasetError, match="records no tokenizer"):
        check_same_data(c, {})
    check_same_data(Curve("ext", 100, [100, 200], {"val": [4.0, 3.0]}), {"tokenizer": "sha256:abc"})  # external: as given


def test_require_comparable_keys():
    a = {"tokenizer": "t", "val": "v", "test": "s", "train": "1x"}
    require_comparable(a, {**a, "train": "2x"}, "x")  # losses compare across training splits
    with pytest.raises(DatasetError, match="x: different train"):
        require_comparable(a, {**a, "train": "2x"}, "x", COMPARABLE + ("train",))
    with pytest.raises(DatasetError, match="different seq_len"):
        require_comparable({**a, "seq_len": 32}, {**a, "seq_len": 64}, "x", COMPARABLE + ("seq_len",))


def _result(tmp_path, text):
    (tmp_path / "result.json").write_text(text)
    return tmp_path


def test_run_loss_of_bad_results(tmp_path):
    v = {"val_loss": 4.0, "test_loss": 4.1}
    run = _result(tmp_path, json.dumps({"variants": {"final": v, "ema": {"val_loss": 3.9, "test_loss": 3.95}}, "best": "ema"}))
    assert run_loss(run, "test")[0] == 3.95 and run_loss(run, "test", "final")[0] == 4.1
    with pytest.raises(ResultError, match="no variant 'swa'"):
        run_loss(run, "test", "swa")
    _result(tmp_path, json.dumps({"variants": {"final": v}, "best": "ema"}))
    with pytest.raises(ResultError, match=r"result.json:1: field 'best' is a string \(.ema.\), not one of the keys of 'variants'"):
        run_loss(run, "test")
    _result(tmp_path, '{"variants": ')
    with pytest.raises(ResultError, match="corrupt"):
        run_loss(run, "test")
    r = subprocess.run([sys.executable, "-m", "slowrun", "efficiency", "--run", str(run)], capture_output=True, text=True)
    assert r.returncode == 2 and "corrupt" in r.stderr and r.stderr.count("\n") == 1


def test_cli_prints_the_efficiency():
    r = subprocess.run([sys.executable, "-m", "slowrun", "efficiency", "--curve", "fineweb", "--loss", "3.195"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("6.13x")
    r = subprocess.run([sys.executable, "-m", "slowrun", "efficiency", "--loss", "2.5"], capture_output=True, text=True)
    assert r.returncode == 2 and "--extrapolate" in r.stderr and r.stderr.count("\n") == 1


def test_power_law_fit_needs_a_point_to_spare():
    # any three points have an exact fit (three parameters): it would extrapolate with an rms residual of 0
    D = np.array([1e5, 2e5, 4e5])
    with pytest.raises(EfficiencyError, match="at least 4 points"):
        fit_power_law(D, 50.0 / D**0.3 + 2.5)
    c = Curve("three", 100_000, [int(d) for d in D], {"test": [5.24, 4.77, 4.45]})
    with pytest.raises(EfficiencyError, match="at least 4 points"):
        place(c, 5.5, extrapolate=True)
    assert place(c, 5.0).efficiency == pytest.approx(1.0 + (5.24 - 5.0) / (5.24 - 4.77))  # inside: interpolated


def test_power_law_fit_reports_its_bound_and_residuals():
    D = np.array([1e5, 2e5, 4e5, 8e5, 1.6e6])
    f = fit_power_law(D, 50.0 / D**0.3 + 2.5)
    assert not f.at_bound and f.as_dict()["status"] == "ok" and len(f.residuals) == 5 and f.rms_residual < 1e-3
    # drops that grow with tokens (not convex in log D): the best E runs to a bound and there is no estimate
    bent = np.array([6.12, 5.79, 5.56, 5.34, 4.89])
    g = fit_power_law(D, bent)
    assert g.at_bound and g.as_dict()["status"].startswith("hit its bound") and "E" not in g.as_dict()
    assert g.E >= 0  # never below zero
    c = Curve("bent", 100_000, [int(d) for d in D], {"test": list(bent)})
    with pytest.raises(EfficiencyError, match="hit its bound"):
        place(c, 4.5, extrapolate=True)


@pytest.mark.parametrize("edit, says", [
    ({"budget": 0}, r"c.json:\d+: field 'budget' is an integer \(0\), not a positive number"),
    ({"tokens": [10, -20]}, r"c.json:\d+: field 'tokens\[1\]' is an integer \(-20\), not a positive number"),
    ({"losses": {"val": [3.0, float("nan")]}}, r"c.json:\d+: field 'losses.val\[1\]' is a number \(NaN\), not a finite number"),
    ({"losses": {"val": [3.0, "2.5"]}}, r"c.json:\d+: field 'losses.val\[1\]' is a string \(.2.5.\), not a finite number"),
])
def test_a_curve_is_read_through_the_validating_reader(tmp_path, edit, says):
    """A budget of 0 gave an efficiency of `infx`; every field is checked when the curve is read."""
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"name": "x", "budget": 10, "tokens": [10, 20], "losses": {"val": [3.0, 2.5]}, **edit}, indent=2))
    with pytest.raises(EfficiencyError, match=says):
        Curve.load(str(p))


def test_a_loss_or_budget_that_is_not_a_number_is_refused():
    curve = Curve.load("fineweb")
    with pytest.raises(EfficiencyError, match="val loss nan: not a finite number"):
        place(curve, float("nan"))
    for budget in (0, -5):
        with pytest.raises(EfficiencyError, match=f"budget {budget}: must be > 0 tokens"):
            place(curve, 3.195, budget=budget)
    r = subprocess.run([sys.executable, "-m", "slowrun", "efficiency", "--loss", "3.195", "--budget", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--budget: must be > 0 tokens" in r.stderr
