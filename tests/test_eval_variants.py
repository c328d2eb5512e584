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
    """A bf16 run with three snapshots and the last two epoch ends kept: variants final, ema,
    snapshot_probs, snapshot_params, epochs_probs, epochs_probs_recency."""
    from slowrun.distributed import CPU_BF16_ENV

    run = tmp_path_factory.mktemp("evalv") / "run"
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 12, "train.snapshot_cycles": 3, "train.dtype": "bf16",
                                  "train.epoch_snapshots": 2, "train.batch_tokens": 8192})  # 2.5 epochs
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CPU_BF16_ENV, "1")  # bf16 on any CPU, emulated where it has no bf16 kernels
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


@pytest.mark.parametrize("variant", ["final", "ema", "snapshot_params", "snapshot_probs", "epochs_probs", "epochs_probs_recency",
                                     "epochs_params_recency"])
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


def test_epoch_snapshots_keep_the_last_ends_and_weight_them_by_recency(snap_run, capsys):
    """12 steps of 8k tokens on 40k: 2.5 epochs; the last two ends kept (epoch 2's and the
    final step's, in epoch 3); the recency variant is -log(1/3 p_2 + 2/3 p_3)."""
    import math

    import numpy as np
    import torch

    from slowrun.checkpoint import read_weights

    run, result = snap_run
    kept = sorted((run / "epochs").glob("epoch_*.safetensors"))
    assert [p.name for p in kept] == ["epoch_002.safetensors", "epoch_003.safetensors"]
    assert [read_weights(p)[2]["epoch"] for p in kept] == [2, 3]
    from slowrun.dataset import Dataset
    from slowrun.checkpoint import load_model
    from slowrun.evaluate import target_logprobs

    ds = Dataset.open(read_weights(kept[0])[1].data.path)
    lps = [target_logprobs(load_model(p)[0], ds.tokens("val"), 32, dtype="bf16") for p in kept]
    recency = -np.mean(np.log(np.exp(lps[0]) / 3 + 2 * np.exp(lps[1]) / 3))
    assert result["variants"]["epochs_probs_recency"]["val_loss"] == pytest.approx(recency, rel=1e-5)
    assert not math.isclose(recency, result["variants"]["epochs_probs"]["val_loss"], rel_tol=1e-7)
    # the recency-weighted parameter average: 1/3 and 2/3 of the two ends' weights
    a, b = (read_weights(p)[0] for p in kept)
    avg = read_weights(run / "epochs_avg_recency.safetensors")[0]
    for k in a:
        assert torch.allclose(avg[k].double(), a[k].double() / 3 + 2 * b[k].double() / 3, atol=1e-6), k
