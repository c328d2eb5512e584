import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slowrun.dataset import Dataset, DatasetError
from slowrun.ensemble import EnsembleError, evaluate_ensemble, fit_mixture, train_ensemble
from slowrun.evaluate import evaluate
from slowrun.checkpoint import load_model
from tests.conftest import smoke_config

OVER = {"train.max_steps": 10, "eval.max_tokens": 512}


@pytest.fixture(scope="module")
def ensemble_run(bpe_ds, tmp_path_factory):
    run = tmp_path_factory.mktemp("ens") / "e"
    result = train_ensemble("smoke", str(bpe_ds), 3, run, OVER, parallel=2, threads=1, fitness_tokens=2000, select=2,
                            progress=False, log=lambda *_: None)
    return run, result


def test_members_tables_and_methods(ensemble_run, bpe_ds):
    run, result = ensemble_run
    assert [json.loads((run / f"member_{k}" / "result.json").read_text())["seed"] for k in range(3)] == [0, 1, 2]
    ds = Dataset.open(bpe_ds)
    # the per-member table is each member's own evaluation
    for k, row in enumerate(result["per_member"]):
        model, cfg, _ = load_model(run / f"member_{k}" / "model.safetensors")
        r = evaluate(model, ds.tokens("val"), cfg.model.seq_len, ds.token_bytes)
        assert row["val_loss"] == pytest.approx(r.loss, rel=1e-6)
    per_k = result["per_k"]
    assert [r["k"] for r in per_k] == [1, 2, 3]
    assert per_k[0]["probs_val_loss"] == pytest.approx(result["per_member"][0]["val_loss"])
    assert per_k[0]["logits_val_loss"] == pytest.approx(result["per_member"][0]["val_loss"], rel=1e-5)
    # averaging probabilities never does worse than the members' mean loss (Jensen)
    mean_member = np.mean([r["test_loss"] for r in result["per_member"]])
    assert result["methods"]["probs"]["test_loss"] <= mean_member + 1e-9
    assert {"probs", "logits", "params"} <= set(result["methods"])
    assert result["test_loss"] == result["methods"]["probs"]["test_loss"]
    sel = result["selection"]
    assert len(sel["selected"]) == 2 and sum(sel["selected_weights"]) == pytest.approx(1.0)
    assert sel["fitness_slice"]["source"] == "training split"
    assert json.loads((run / "result.json").read_text())["per_k"] == per_k


def test_probability_average_computed_by_hand(ensemble_run, bpe_ds):
    run, result = ensemble_run
    ds = Dataset.open(bpe_ds)
    T = 32
    n = len(ds.tokens("val")) // (T + 1)
    chunks = torch.from_numpy(np.asarray(ds.tokens("val")[: n * (T + 1)], dtype=np.int64).reshape(n, T + 1))
    probs = 0
    for k in range(2):
        model, _, _ = load_model(run / f"member_{k}")
        with torch.no_grad():
            logits, _ = model(chunks[:, :-1])
        probs = probs + torch.softmax(logits, -1) / 2
    loss = -probs.gather(-1, chunks[:, 1:, None]).log().mean().item()
    assert result["per_k"][1]["probs_val_loss"] == pytest.approx(loss, rel=1e-5)


def test_resumes_and_continues_where_it_stopped(ensemble_run, bpe_ds):
    run, _ = ensemble_run
    stamp = (run / "member_0" / "result.json").stat().st_mtime
    (run / "member_2" / "result.json").unlink()  # as if stopped during the last member
    again = train_ensemble("smoke", str(bpe_ds), 3, run, OVER, fitness_tokens=2000, select=2, progress=False,
                           log=lambda *_: None)
    assert (run / "member_0" / "result.json").stat().st_mtime == stamp
    assert (run / "member_2" / "result.json").is_file() and len(again["per_member"]) == 3
    # the first call trained every member: its clock time for them is at least each member's own; the second
    # trained one of three, so the members' elapsed time is not known
    first = ensemble_run[1]
    walls = [json.loads((run / f"member_{k}" / "result.json").read_text())["wall_s"] for k in (0, 1)]
    assert first["members_elapsed_s"] >= max(walls) and again["members_elapsed_s"] is None


def test_chain_distillation(bpe_ds, tmp_path):
    result = train_ensemble("smoke", str(bpe_ds), 2, tmp_path / "d", OVER, distill=True, alpha=0.5, temperature=1.2,
                            progress=False, log=lambda *_: None)
    cfg1 = json.loads((tmp_path / "d" / "member_1" / "result.json").read_text())["config"]
    assert cfg1["distill"]["teacher"].startswith(str(tmp_path / "d" / "member_0"))
    assert json.loads((tmp_path / "d" / "member_0" / "result.json").read_text())["config"]["distill"]["teacher"] == ""
    assert result["distill"]["enabled"] and result["distill"]["mode"] == "chain"


def test_an_ensemble_distilled_into_its_last_member(bpe_ds, tmp_path):
    """--distill ensemble: members 0 and 1 train side by side as a plain ensemble, then member 2
    learns from both (their weights files, in order); the three are evaluated together."""
    result = train_ensemble("smoke", str(bpe_ds), 3, tmp_path / "s", OVER, distill="ensemble", alpha=0.5,
                            temperature=1.2, parallel=2, threads=1, progress=False, log=lambda *_: None)
    configs = [json.loads((tmp_path / "s" / f"member_{k}" / "result.json").read_text())["config"] for k in range(3)]
    assert [c["distill"]["teacher"] for c in configs[:2]] == ["", ""]
    teachers = configs[2]["distill"]["teacher"].split(",")
    assert [Path(t).parent for t in teachers] == [tmp_path / "s" / "member_0", tmp_path / "s" / "member_1"]
    assert all(Path(t).is_file() for t in teachers)
    assert result["distill"]["mode"] == "ensemble" and len(result["members"]) == 3
    with pytest.raises(EnsembleError, match="must be >= 2 .teachers and a student., got 1"):
        train_ensemble("smoke", str(bpe_ds), 1, tmp_path / "one", OVER, distill="ensemble", progress=False)
    with pytest.raises(EnsembleError, match="chain or ensemble, got 'tree'"):
        train_ensemble("smoke", str(bpe_ds), 2, tmp_path / "tree", OVER, distill="tree", progress=False)


def test_failed_members_are_named_one_line_each(bpe_ds, tmp_path):
    """issue 35, item 1: members that fail (a sequence longer than the val split) are each named on
    a line of their own, with their error, and nothing is evaluated."""
    from slowrun.jobs import JobsFailed

    over = {"model.seq_len": 16384, "train.batch_tokens": 16384, "train.max_steps": 2}
    with pytest.raises(JobsFailed) as e:
        train_ensemble("smoke", str(bpe_ds), 2, tmp_path / "e", over, parallel=2, threads=1, progress=False)
    head, *lines = str(e.value).splitlines()
    assert head == "2 run(s) failed; the ensemble was not evaluated:"
    assert [line.split(": ", 1)[0] for line in lines] == [f"  {tmp_path / 'e' / f'member_{k}'}" for k in (0, 1)]
    assert all("val" in line for line in lines) and not (tmp_path / "e" / "result.json").exists()


def test_bad_inputs(ensemble_run, prepare_dataset, bpe_ds, tmp_path):
    from slowrun.train import train

    run, _ = ensemble_run
    other_ds = prepare_dataset(tmp_path / "ds", tokenizer="bpe:300")
    train(smoke_config(other_ds, **{"train.max_steps": 2}), tmp_path / "other", echo=False)
    with pytest.raises(DatasetError, match="cannot be ensembled.*different tokenizer"):
        evaluate_ensemble([str(run / "member_0"), str(tmp_path / "other")])
    r = subprocess.run([sys.executable, "-m", "slowrun", "ensemble", "--eval", str(run / "member_0"), str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such run" in r.stderr
    with pytest.raises(EnsembleError, match="cannot be selected"):
        evaluate_ensemble([str(tmp_path / "other")], fitness_tokens=1000)
    # a distillation teacher passes the same check as an ensemble member
    with pytest.raises(DatasetError, match="distill.teacher .* different tokenizer"):
        train(smoke_config(bpe_ds, **{"distill.teacher": str(tmp_path / "other")}), tmp_path / "student", echo=False)


def test_mixture_fit_prefers_the_better_member():
    rng = np.random.default_rng(0)
    good = np.log(rng.uniform(0.5, 0.9, 4000))
    bad = np.log(rng.uniform(0.01, 0.2, 4000))
    w = fit_mixture(np.stack([bad, good]))
    assert w[1] > 0.9


def test_members_trained_on_more_data_cannot_be_selected_on_its_fitness_slice(bpe_ds, prepare_dataset, tmp_path):
    """A 2x member has trained on the tokens at the end of the 1x training split: selecting it on
    that slice (--data 1x) would score it on its own training data."""
    from slowrun.train import train

    double = prepare_dataset(tmp_path / "bpe2x", tokenizer=str(bpe_ds / "tokenizer.json"), train_tokens=80_000)
    train(smoke_config(double, **{"train.max_steps": 2, "data.fitness_tokens": 2000}), tmp_path / "m2x", echo=False)
    train(smoke_config(bpe_ds, **{"train.max_steps": 2, "data.fitness_tokens": 2000}), tmp_path / "m1x", echo=False)
    with pytest.raises(EnsembleError, match="different train.*cannot be selected"):
        evaluate_ensemble([str(tmp_path / "m1x"), str(tmp_path / "m2x")], str(bpe_ds), fitness_tokens=1000, select=1)
    # each on its own training split's slice is fine, and the 2x member still evaluates on 1x val/test
    assert evaluate_ensemble([str(tmp_path / "m1x")], str(bpe_ds), fitness_tokens=1000, select=1)["selection"]
    assert evaluate_ensemble([str(tmp_path / "m2x")], str(bpe_ds), log=lambda *_: None)["per_member"]


def test_one_run_named_twice_is_refused(ensemble_run, tmp_path):
    """`--eval r1 r1` averaged one model with itself and reported it as an ensemble of two."""
    run, _ = ensemble_run
    m0 = run / "member_0"
    with pytest.raises(EnsembleError, match="member_0/ and .*member_0 are the same weights"):
        evaluate_ensemble([str(m0), str(run / "member_1"), f"{m0}/"])
    r = subprocess.run([sys.executable, "-m", "slowrun", "ensemble", "--eval", str(m0), str(m0)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "are the same weights" in r.stderr, r.stderr
