import json
import subprocess
import sys

import pytest

from slowrun.dataset import Dataset
from slowrun.efficiency import Curve, place
from slowrun.sweep import SweepConfig, sweep


def test_sweep_makes_a_resumable_curve(bpe_ds, tmp_path):
    cfg = SweepConfig("smoke", str(bpe_ds), str(tmp_path / "sw"), budgets=[1, 2],
                      grid={"optim.lr": [0.003, 0.01], "model.n_embd": [32, 64]},
                      fixed={"train.max_steps": -1, "train.epochs": 0.2, "eval.max_tokens": 512},
                      grid_by_budget={2: {"optim.lr": [0.005]}}, jobs=2, threads=1, progress=False)
    curve = sweep(cfg)
    assert curve["tokens"] == [40_000, 80_000] and len(curve["points"]) == 6
    assert {p["point"]["optim.lr"] for p in curve["points"] if p["budget"] == 2} == {0.005}
    assert all(p["val_loss"] is not None for p in curve["points"])
    for b, chosen in zip((1, 2), curve["chosen"]):
        best = min(p["val_loss"] for p in curve["points"] if p["budget"] == b)
        assert chosen["val_loss"] == best  # chosen by val...
    assert curve["losses"]["test"] == [c["test_loss"] for c in curve["chosen"]]  # ...reported on test
    # the 2x dataset is nested: same val/test/tokenizer, its train split starts with the 1x one
    two = Dataset.open(tmp_path / "sw" / "data" / "2x")
    assert two.fingerprint == Dataset.open(bpe_ds).fingerprint
    assert curve["dataset"] == Dataset.open(bpe_ds).fingerprint and curve["grid"]["optim.lr"] == [0.003, 0.01]
    # rerunning redoes nothing
    mtimes = {p["run_dir"]: (tmp_path / p["run_dir"] / "result.json").stat().st_mtime for p in curve["points"]}
    again = sweep(cfg)
    assert again["chosen"] == curve["chosen"]
    assert all((tmp_path / d / "result.json").stat().st_mtime == t for d, t in mtimes.items())
    # the curve works with `slowrun efficiency`
    c = Curve.load(str(tmp_path / "sw" / "curve.json"))
    lo, hi = sorted(c.losses["test"])
    assert place(c, (lo + hi) / 2).efficiency == pytest.approx(1.5, abs=0.51)


def test_parameter_scaling_fit(bpe_ds, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slowrun", "sweep", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--out", str(tmp_path / "sc"), "--grid", "model.n_embd=16,32,64", "--fit-params",
                        "--set", "train.max_steps=15", "--set", "eval.max_tokens=512", "--jobs", "2", "--threads", "1",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    curve = json.loads((tmp_path / "sc" / "curve.json").read_text())
    scaling = curve["scaling"]
    assert [p["params"] for p in scaling["points"]] == sorted(p["params"] for p in scaling["points"])
    assert "fit" in scaling and "estimated loss at infinite compute" in r.stdout


def test_sweep_rejects_bad_grid_keys(bpe_ds, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slowrun", "sweep", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--out", str(tmp_path / "x"), "--grid", "optim.lrr=1,2"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'optim.lrr'" in r.stderr
