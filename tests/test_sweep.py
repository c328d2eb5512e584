import json
import re
import subprocess
import sys

import pytest

from slowrun.dataset import Dataset
from slowrun.efficiency import Curve, EfficiencyError, place
from slowrun.sweep import SweepConfig, sweep
from tests.conftest import with_field_added_later


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
    l1, l2 = c.losses["test"]
    if l2 < l1:  # halfway in loss between the 1x and 2x points is halfway in tokens: 1.5x, exactly
        assert place(c, (l1 + l2) / 2).efficiency == pytest.approx(1.5, rel=1e-9)
    else:  # 2x was no better: the envelope is flat and nothing below 1x's loss is on the curve
        with pytest.raises(EfficiencyError, match="below the curve's range"):
            place(c, l1 - 0.01)


def test_parameter_scaling_fit(bpe_ds, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slowrun", "sweep", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--out", str(tmp_path / "sc"), "--grid", "model.n_embd=16,32,48,64", "--fit-params",
                        "--set", "train.max_steps=15", "--set", "eval.max_tokens=512", "--jobs", "2", "--threads", "1",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    curve = json.loads((tmp_path / "sc" / "curve.json").read_text())
    scaling = curve["scaling"]
    assert [p["params"] for p in scaling["points"]] == sorted(p["params"] for p in scaling["points"])
    fit = scaling["fit"]
    assert len(fit["residuals"]) == 4
    if fit["status"] == "ok":  # a real estimate: E >= 0 and printed as such
        assert fit["E"] >= 0 and f"infinite compute E = {fit['E']:.4f}" in r.stdout
    else:  # a fit on its bound is said to be one, with no number
        assert "E" not in fit and "hit its bound" in r.stdout
    # three sizes: three parameters through three points, no fit, and why
    from slowrun.sweep import describe, fit_scaling
    three = fit_scaling(scaling["points"][:3])
    assert "E" not in three["fit"] and three["fit"]["status"].startswith("no fit") and "at least 4 points" in three["fit"]["status"]
    assert "at least 4 points" in describe({**curve, "scaling": three})


def test_sweep_rejects_bad_grid_keys(bpe_ds, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slowrun", "sweep", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--out", str(tmp_path / "x"), "--grid", "optim.lrr=1,2"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'optim.lrr'" in r.stderr


def test_ledger_expand_refine_seeds(bpe_ds, tmp_path):
    """A sweep tuned the CPU track's way: sizes expanded off the edge, the chosen point refined
    and re-seeded, every run in the ledger; on a 'new machine' (no run directories) the same
    sweep trains nothing and gives the same curve."""
    ledger = tmp_path / "results" / "ledger.jsonl"
    cfg = SweepConfig("smoke", str(bpe_ds), str(tmp_path / "a"), budgets=[1],
                      grid={"model.n_layer": [1]},
                      fixed={"train.max_steps": -1, "train.epochs": 0.1, "eval.max_tokens": 512, "eval.test": True},
                      jobs=2, threads=1, progress=False, ledger=str(ledger), expand="model.n_layer",
                      refine={1: {"optim.lr_scale": [0.5, 2.0]}}, seeds=2)
    curve = sweep(cfg)
    pts = [p for p in curve["points"] if p["val_loss"] is not None]
    tuning = [p for p in pts if "train.seed" not in p["point"]]
    layers = {p["config"]["model"]["n_layer"] for p in tuning}
    (c,) = curve["chosen"]
    n = c["point"]["model.n_layer"]
    assert layers >= {1, 2} and n != max(layers) and (n != min(layers) or n == 1)  # never at the grown edge
    assert any(p["phase"] == "expand" for p in pts)
    refine = [p for p in pts if p["phase"] == "refine"]
    assert sorted(p["point"]["optim.lr_scale"] for p in refine) == [0.5, 2.0]
    assert c["val_loss"] == min(p["val_loss"] for p in tuning if True) or c["seeds"] == 2
    seed0 = min(tuning, key=lambda p: p["val_loss"])
    assert seed0["point"] == c["point"]
    seed1 = next(p for p in pts if p["point"] == {**c["point"], "train.seed": 1})
    assert c["seeds"] == 2 and c["test_losses"] == [seed0["test_loss"], seed1["test_loss"]]
    assert c["test_loss"] == pytest.approx((seed0["test_loss"] + seed1["test_loss"]) / 2)
    assert c["test_spread"] == pytest.approx(abs(seed0["test_loss"] - seed1["test_loss"]))
    assert curve["losses"]["test"] == [c["test_loss"]]
    if any(p["val_loss"] < min(q["val_loss"] for q in tuning if q["phase"] != "refine") for p in refine):
        assert "refined_from" in c
    lines = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert len(lines) == len(pts) and {x["key"] for x in lines} == {p["key"] for p in pts}
    assert all(x["dataset"]["train_tokens"] == 40_000 and x["variants"] for x in lines)
    # a new machine: another sweep directory, the same committed ledger -> nothing is trained
    again = sweep(SweepConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}))
    assert not (tmp_path / "b" / "runs").exists()
    assert again["chosen"][0]["test_loss"] == c["test_loss"] and again["chosen"][0]["point"] == c["point"]
    assert len(ledger.read_text().splitlines()) == len(lines)  # nothing appended twice


def test_expansion_walks_through_points_found_in_the_ledger(bpe_ds, tmp_path, monkeypatch):
    """The size axis grows past several finished points: with n_layer 2 and 3 already in the
    ledger (3 the best so far), the sweep goes on to train n_layer 4, instead of stopping at
    the first finished point it meets and choosing n_layer 2 (the bug: it did)."""
    from slowrun import sweep as sweep_mod

    losses = {1: 5.0, 2: 4.0, 3: 3.0, 4: 3.5}  # val loss by n_layer: best at 3, 4 worse
    trained = []

    def entry(n):
        return {"variants": {"final": {"val_loss": losses[n]}}, "best": "final", "config": {"model": {"n_layer": n}}}

    def fake_run_jobs(jobs, *a, on_done=None, **k):
        for j in jobs:
            trained.append(j.tag["point"]["model.n_layer"])
            runs.results[j.run_dir] = entry(j.tag["point"]["model.n_layer"])
        return {}

    def from_ledger(self, job):  # n_layer 2 and 3 finished on another machine
        if job.tag["point"]["model.n_layer"] in (2, 3):
            self.results[job.run_dir] = entry(job.tag["point"]["model.n_layer"])

    monkeypatch.setattr(sweep_mod, "run_jobs", fake_run_jobs)
    monkeypatch.setattr(sweep_mod.Runs, "_lookup", from_ledger)
    cfg = SweepConfig("smoke", str(bpe_ds), str(tmp_path / "a"), budgets=[1], grid={"model.n_layer": [1]},
                      progress=False, expand="model.n_layer")
    runs = sweep_mod.Runs(cfg)
    runs.run([runs.job(1, {"model.n_layer": 1})], "grid")
    sweep_mod.expand(runs)
    assert trained == [1, 4] and runs.value(runs.best(1), "model.n_layer") == 3


def test_plan_names_each_budgets_next_runs_and_trains_nothing(bpe_ds, tmp_path, monkeypatch):
    """`--plan` walks the sweep's phases as results come in (grid, then the size past an edge-bound
    best, then the refinement, then the second seed, then done), and prices the runs from the
    ledger's CPU runs, counting only what a started run has left after its checkpoint."""
    from slowrun import sweep as sweep_mod
    from slowrun.config import build_config
    from slowrun.gpt import GPT

    losses = {1: 5.0, 2: 4.0, 3: 4.5}
    finished = set()  # (n_layer, lr_scale, seed)

    def fake_lookup(self, job):
        p = job.tag["point"]
        k = (p["model.n_layer"], p.get("optim.lr_scale", 1.0), p.get("train.seed", 0))
        if k in finished:
            self.results[job.run_dir] = {"variants": {"final": {"val_loss": losses[k[0]] + (k[1] != 1.0) * 0.1}},
                                         "best": "final", "config": {"model": {"n_layer": k[0]}, "optim": {"lr_scale": k[1]}}}

    def no_training(*a, **k):
        raise AssertionError("plan trained a run")

    monkeypatch.setattr(sweep_mod.Runs, "_lookup", fake_lookup)
    monkeypatch.setattr(sweep_mod, "run_jobs", no_training)
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"format": "slowrun-ledger/1", "key": "x", "dataset": {}, "device": "cpu (x86_64, 1 threads)",
                                  "variants": {"final": {"val_loss": 5.0}}, "best": "final",
                                  "threads": 1, "train_wall_s": 100.0, "params": 1000, "tokens_seen": 1000}) + "\n")
    cfg = SweepConfig("smoke", str(bpe_ds), str(tmp_path / "sw"), budgets=[1], grid={"model.n_layer": [1, 2]},
                      fixed={"train.max_steps": -1, "train.epochs": 1.0}, threads=1, progress=False, ledger=str(ledger),
                      expand="model.n_layer", refine={1: {"optim.lr_scale": [0.5]}}, seeds=2)

    def step():
        runs, (p,) = sweep_mod.plan(cfg)
        return runs, p.phase, [j.tag["point"] for j in p.jobs]

    assert step()[1:] == ("grid", [{"model.n_layer": 1}, {"model.n_layer": 2}])
    finished |= {(1, 1.0, 0), (2, 1.0, 0)}
    assert step()[1:] == ("expand", [{"model.n_layer": 3}])
    finished.add((3, 1.0, 0))
    assert step()[1:] == ("refine", [{"model.n_layer": 2, "optim.lr_scale": 0.5}])
    finished.add((2, 0.5, 0))
    runs, phase, points = step()
    assert (phase, points) == ("seeds", [{"model.n_layer": 2, "train.seed": 1}])

    # the price: 1e-4 s per parameter-token (the ledger's one CPU run) x the model's parameters x the tokens
    # its steps train on: ceil((40,000 - 1) // 32 sequences / 32 a step) = 40 steps of 1,024 tokens
    smoke = build_config("smoke", {"model.n_layer": 2, "model.vocab_size": 512, "data.path": str(bpe_ds)})
    params = GPT(smoke.model).num_params()
    job = runs.jobs[-1]
    tokens = 40 * 1024
    text = sweep_mod.describe_plan(runs, sweep_mod.plan(cfg)[1])
    assert f"~{1e-4 * params * tokens / 3600:.1f} CPU h" in text and "median of 1 CPU run(s)" in text
    assert f"{params / 1e6:7.2f}M params" in text and "n_layer=2, seed=1" in text
    (job.run_dir / "checkpoints" / "step_0000004").mkdir(parents=True)  # started: 4 steps done
    left = 1 - 4 * smoke.train.batch_tokens / tokens
    text = sweep_mod.describe_plan(runs, sweep_mod.plan(cfg)[1])
    assert f"~{1e-4 * params * tokens * left / 3600:.1f} CPU h (resumes at {1 - left:.0%}: step_0000004)" in text

    finished.add((2, 1.0, 1))
    assert step()[1:] == ("done", [])
    assert "    1x  done" in sweep_mod.describe_plan(*sweep_mod.plan(cfg))


def test_no_train_curve_holds_only_finished_budgets(bpe_ds, tmp_path, monkeypatch):
    """`sweep(train=False)`: a curve from the runs finished so far, training nothing. A budget
    enters it only when every phase is finished (1x and 2x here: grid and second seed); 4x, its
    grid half finished, is named under `pending` with its next phase; with no budget finished
    the sweep says so instead of writing an empty curve."""
    from slowrun import sweep as sweep_mod
    from slowrun.sweep import SweepError

    val = {(1, 1, 0): 5.0, (1, 2, 0): 4.0, (1, 2, 1): 4.2, (2, 1, 0): 3.5, (2, 2, 0): 3.0, (2, 2, 1): 3.2,
           (4, 1, 0): 2.5}  # (budget, n_layer, seed) -> val loss

    def fake_lookup(self, job):
        p = job.tag["point"]
        k = (job.tag["budget"], p["model.n_layer"], p.get("train.seed", 0))
        if k in val:
            self.results[job.run_dir] = {"variants": {"final": {"val_loss": val[k], "test_loss": val[k] + 0.1,
                                                                "val_bpb": 1.0, "test_bpb": 1.0}},
                                         "best": "final", "params": 1000, "wall_s": 1.0, "device": "cpu",
                                         "config": {"model": {"n_layer": k[1]}}}

    def no_training(*a, **k):
        raise AssertionError("a no-train sweep trained a run")

    monkeypatch.setattr(sweep_mod.Runs, "_lookup", fake_lookup)
    monkeypatch.setattr(sweep_mod, "run_jobs", no_training)
    cfg = SweepConfig("smoke", str(bpe_ds), str(tmp_path / "sw"), budgets=[1, 2, 4], grid={"model.n_layer": [1, 2]},
                      fixed={"train.max_steps": -1, "train.epochs": 1.0}, progress=False, seeds=2)
    curve = sweep(cfg, train=False)
    assert [c["budget"] for c in curve["chosen"]] == [1, 2] and curve["tokens"] == [40_000, 80_000]
    assert curve["losses"]["val"] == [pytest.approx(4.1), pytest.approx(3.1)]  # each the mean of its 2 seeds
    assert curve["losses"]["test"] == [pytest.approx(4.2), pytest.approx(3.2)]
    assert curve["pending"] == {"4x": "grid, 1 run(s) to train"}
    assert json.loads((tmp_path / "sw" / "curve.json").read_text())["pending"] == curve["pending"]
    assert "4x  not in the curve yet: grid, 1 run(s) to train" in sweep_mod.describe(curve)
    # usable by `slowrun efficiency` as it stands: halfway between the 1x and 2x test losses is 1.5x
    assert place(Curve.load(str(tmp_path / "sw" / "curve.json")), 3.7).efficiency == pytest.approx(1.5)
    val.pop((1, 2, 1))
    val.pop((2, 2, 1))  # neither second seed finished: no budget is complete
    with pytest.raises(SweepError, match=r"no budget is complete yet \(1x: seeds, 2x: seeds, 4x: grid\)"):
        sweep(cfg, train=False)


def test_a_run_directory_outlives_a_config_field_added_later(bpe_ds, tmp_path, monkeypatch):
    """A sweep's (and so an ablation's) run directory is named by the config as the ledger keys
    it: a field a later version adds, at its default, leaves the name as it was (an interrupted
    run resumes from its checkpoints under the new code); set to another value, it names
    another run."""
    from slowrun import sweep as sweep_mod

    cfg = SweepConfig("smoke", str(bpe_ds), str(tmp_path / "s"), budgets=[1], progress=False)
    before = sweep_mod.Runs(cfg).job(1, {"model.n_layer": 2}).run_dir

    def later(value):
        with_field_added_later(monkeypatch, sweep_mod, value)
        return sweep_mod.Runs(cfg).job(1, {"model.n_layer": 2}).run_dir

    assert later(0) == before and later(3) != before
    assert before.name.startswith("n_layer=2-")


def _sweep_cli(bpe_ds, out, *args):
    return [sys.executable, "-m", "slowrun", "sweep", "--recipe", "smoke", "--data", str(bpe_ds), "--out", str(out),
            "--threads", "1", "--no-progress", "--set", "eval.max_tokens=512", *args]


def test_a_failed_point_fails_the_sweep(bpe_ds, tmp_path):
    """issue 35, item 1: a point that fails (a sequence longer than the val split) makes the sweep
    exit non-zero naming it on one line, no traceback; its budget is not complete, so no curve
    is written from the point that survived."""
    out = tmp_path / "sw"
    r = subprocess.run(_sweep_cli(bpe_ds, out, "--budgets", "1", "--grid", "model.seq_len=32,16384",
                                  "--set", "train.batch_tokens=16384", "--set", "train.max_steps=3"),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    named = [line for line in r.stderr.splitlines() if "seq_len=16384" in line]
    assert len(named) == 1 and re.search(r"16,?385", named[0]), r.stderr  # the run and its error
    assert "seq_len=32-" not in r.stderr  # the point that finished is no failure
    assert not (out / "curve.json").exists()


def test_a_budget_with_a_failed_point_stays_out_of_the_curve(bpe_ds, tmp_path, monkeypatch):
    """issue 35, item 1: at 2x one grid point fails; 1x goes on to its refinement and enters the
    curve; 2x is not refined, stays out of the curve (said under `pending`, the point keeps its
    error) and the sweep raises naming the failed run, once the curve of 1x is written."""
    from slowrun import sweep as sweep_mod
    from slowrun.jobs import JobsFailed

    trained = []

    def fake_run_jobs(jobs, *a, on_done=None, **k):
        failures = {}
        for j in jobs:
            b, p = j.tag["budget"], j.tag["point"]
            trained.append((b, p.get("model.n_layer"), p.get("optim.lr_scale", 1.0)))
            if (b, p["model.n_layer"]) == (2, 2):
                failures[j.run_dir] = "ValueError: no"
                continue
            loss = 5.0 - p["model.n_layer"] - b + 0.1 * (p.get("optim.lr_scale", 1.0) != 1.0)
            runs.results[j.run_dir] = {"variants": {"final": {"val_loss": loss, "test_loss": loss, "val_bpb": 1.0,
                                                              "test_bpb": 1.0}},
                                       "best": "final", "params": 1000, "wall_s": 1.0, "device": "cpu",
                                       "config": {"model": {"n_layer": p["model.n_layer"]},
                                                  "optim": {"lr_scale": p.get("optim.lr_scale", 1.0)}}}
        return failures

    real_runs = sweep_mod.Runs

    def keep(cfg):
        nonlocal runs
        runs = real_runs(cfg)
        return runs

    runs = None
    monkeypatch.setattr(sweep_mod, "run_jobs", fake_run_jobs)
    monkeypatch.setattr(sweep_mod, "Runs", keep)
    cfg = SweepConfig("smoke", str(bpe_ds), str(tmp_path / "sw"), budgets=[1, 2], grid={"model.n_layer": [1, 2]},
                      fixed={"train.max_steps": 2}, progress=False, refine={1: {"optim.lr_scale": [0.5]},
                                                                            2: {"optim.lr_scale": [0.5]}})
    with pytest.raises(JobsFailed) as e:
        sweep(cfg)
    failed = runs.jobs[3].run_dir
    assert runs.jobs[3].tag["point"] == {"model.n_layer": 2} and runs.jobs[3].tag["budget"] == 2
    assert str(e.value).splitlines()[1:] == [f"  {failed}: ValueError: no"]
    assert "2x" in str(e.value).splitlines()[0]
    assert sorted(trained) == [(1, 1, 1.0), (1, 2, 0.5), (1, 2, 1.0), (2, 1, 1.0), (2, 2, 1.0)]  # 2x not refined
    curve = json.loads((tmp_path / "sw" / "curve.json").read_text())
    assert e.value.partial == curve
    assert [c["budget"] for c in curve["chosen"]] == [1] and curve["tokens"] == [40_000]
    assert "1 run(s) failed" in curve["pending"]["2x"]
    assert next(p for p in curve["points"] if p["run_dir"] == str(failed))["error"] == "ValueError: no"


def test_sigterm_stops_the_sweep_and_a_rerun_resumes(bpe_ds, tmp_path):
    """issue 35, item 2: SIGTERM to a sweep reaches its `slowrun train` (which checkpoints), the
    sweep waits for it and exits 143 with one line saying how to resume; the same command
    again resumes the run from its checkpoint (no 'in use by another slowrun process')."""
    import os
    import signal
    import time
    from pathlib import Path

    out = tmp_path / "sw"
    cmd = _sweep_cli(bpe_ds, out, "--set", "train.max_steps=150", "--set", "train.log_every=1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        t0 = time.time()
        while True:  # until the run's first step: its lock names its process
            assert p.poll() is None and time.time() - t0 < 60, p.communicate()
            logs = list(out.glob("runs/1x/*/log.txt"))
            if logs and "step      1/150" in logs[0].read_text():
                child = int((logs[0].parent / ".lock").read_text())
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if child is not None and Path(f"/proc/{child}").exists() and open(f"/proc/{child}/stat").read().split()[2] != "Z":
            os.kill(child, signal.SIGKILL)  # an orphan of the code under test: never left running
            pytest.fail("the run outlived the sweep")
    assert p.returncode == 143 and err.strip().splitlines() == [err.strip()] and "same command" in err, err
    run_dir = logs[0].parent
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    assert not (run_dir / "result.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "in use by another" not in r.stdout + r.stderr
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 150
    log = (run_dir / "log.txt").read_text()
    assert "stopping: SIGTERM" in log and f"resumed from {ckpt}" in log
    assert json.loads((out / "curve.json").read_text())["losses"]["val"][0] is not None
