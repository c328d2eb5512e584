"""`slowrun eval` scores the variant a run chose (or --variant), in the run's dtype, and reproduces
the final evaluation's numbers, probability-averaged variants included."""

import json
import shutil

import pytest

from slowrun.cli import main
from slowrun.train import train
from tests.conftest import smoke_config


@pytest.fixture(scope="module")
def snap_run(bpe_ds, tmp_path_factory):
    """A bf16 run with three snapshots: variants final, ema, snapshot_probs, snapshot_params."""
    run = tmp_path_factory.mktemp("evalv") / "run"
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 12, "train.snapshot_cycles": 3, "train.dtype": "bf16"})
    result = train(cfg, run, echo=False)
    return run, result


def _eval(capsys, *args) -> dict:
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_defaults_to_the_chosen_variant_and_the_runs_dtype(snap_run, capsys):
    run, result = snap_run
    out = _eval(capsys, run)
    assert out["dtype"] == "bf16"
    assert out["scored"].startswith(f"variant {result['best']}")
    assert out["loss"] == pytest.approx(result["variants"][result["best"]]["val_loss"], rel=1e-6)
    assert main(["eval", str(run)]) == 0
    line = capsys.readouterr().out
    assert f"variant {result['best']}" in line and "bf16" in line


@pytest.mark.parametrize("variant", ["final", "ema", "snapshot_params", "snapshot_probs"])
def test_each_variant_reproduces_the_final_evaluation(snap_run, capsys, variant):
    run, result = snap_run
    out = _eval(capsys, run, "--variant", variant, "--split", "test")
    assert out["loss"] == pytest.approx(result["variants"][variant]["test_loss"], rel=1e-6)
    if variant == "snapshot_probs":  # the three snapshots' probabilities, averaged
        assert len(out["weights"]) == 3 and all("swa/cycle_" in w for w in out["weights"])


def test_eval_refusals_are_one_line(snap_run, tmp_path, capsys):
    run, _ = snap_run
    assert main(["eval", str(run), "--variant", "swa_probs"]) == 2  # a variant this run does not have
    err = capsys.readouterr().err
    assert "no variant 'swa_probs'" in err and err.count("\n") == 1
    assert main(["eval", str(run), "--max-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-tokens: must be -1" in err and err.count("\n") == 1
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "result.json").write_text('{"variants": {"final": ')
    assert main(["eval", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and err.count("\n") == 1
