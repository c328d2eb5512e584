import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from slowrun.ablate import AblateConfig, AblateError, TECHNIQUES, ablate, techniques_on
from slowrun.config import build_config


def _test_loss(run_dir: str) -> tuple[float, float]:
    r = json.loads((Path(run_dir) / "result.json").read_text())
    best = r["variants"][r["best"]]
    return best["test_loss"], best["val_loss"]


def test_every_off_override_turns_its_technique_off():
    """Each table row's overrides give a valid config in which that technique is off (the
    slowrun recipe, with the rarer techniques switched on so every row is exercised)."""
    on = {"model.stoch_depth": 0.05, "model.loop_start": 1, "model.loop_end": 2, "model.loop_repeats": 2,
          "model.mtp_weight": 0.3, "model.window_pattern": "SL", "model.xsa": "fixed", "model.iha": True,
          "optim.muon_eq_r": True, "optim.normuon": True, "optim.cautious_wd": True, "optim.wd_end_frac": 0.5,
          "model.tie_embeddings": False, "optim.swa_epochs": 2}
    cfg = build_config("slowrun", on)
    assert [t.name for t in techniques_on(cfg)] == [t.name for t in TECHNIQUES]
    for t in TECHNIQUES:
        off = build_config("slowrun", {**on, **t.off(cfg)})
        assert not t.is_on(off), t.name
        still = {u.name for u in TECHNIQUES if u.is_on(off)}
        goes_too = {"muon": {"muon_eq_r", "normuon"}, "multi_epoch": {"swa"}}.get(t.name, set())  # said in `what`
        assert still == {u.name for u in TECHNIQUES} - {t.name} - goes_too, t.name
    muon = next(t for t in TECHNIQUES if t.name == "muon").off(cfg)
    assert muon["optim.name"] == "adamw" and muon["optim.embed_lr"] == cfg.optim.lr  # the other groups keep their lr


def test_ablate_smoke_two_techniques(bpe_ds, tmp_path, monkeypatch):
    out = tmp_path / "ab"
    # the swap at equal wall time: 1.5x the full recipe's step time (as timed here) -> 2 steps of the full's 3
    monkeypatch.setattr("slowrun.ablate.step_time", lambda r, d, over, dtype, th: 0.15 if "optim.weight_decay" in over else 0.1)
    ab = ablate(AblateConfig("smoke", str(bpe_ds), str(out), seeds=2, only=["value_proj", "swiglu"], jobs=2, threads=1,
                             fixed={"train.max_steps": 3}, progress=False, ledger=str(tmp_path / "ledger.jsonl"),
                             variants={"wd0": {"optim.weight_decay": 0.0}}, equal_time=True))
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["full"] == json.loads(json.dumps(ab["full"]))
    assert [v["technique"] for v in saved["variants"]] == ["swiglu", "value_proj", "wd0"]  # table order, swaps last
    full = [_test_loss(d) for d in saved["full"]["run_dirs"]]
    assert saved["full"]["seeds"] == 2 and len(set(saved["full"]["run_dirs"])) == 2
    swap = saved["variants"][2]  # a swap: the recipe with weight decay 0, p that it is better
    assert swap["swap"] and "p_hurts" not in swap and swap["off"] == {"optim.weight_decay": 0.0, "train.max_steps": 2}
    assert swap["step_s"] == 0.15 and swap["full_step_s"] == 0.1 and "step_s" not in saved["full"] and saved["equal_time"]
    for d in swap["run_dirs"]:
        r = json.loads((Path(d) / "result.json").read_text())
        assert r["config"]["optim"]["weight_decay"] == 0.0 and r["config"]["train"]["max_steps"] == 2 and r["steps"] == 2
    from scipy import stats

    want_p = stats.ttest_ind([t for t, _ in full], swap["test_losses"], equal_var=False, alternative="greater").pvalue
    assert swap["p_better"] == pytest.approx(want_p, rel=1e-9)
    want_p_val = stats.ttest_ind([v for _, v in full], swap["val_losses"], equal_var=False, alternative="greater").pvalue
    assert swap["p_better_val"] == pytest.approx(want_p_val, rel=1e-9)  # the track decides on val
    for v in saved["variants"][:2]:
        assert v["seeds"] == 2 and len(v["test_losses"]) == 2
        losses = [_test_loss(d) for d in v["run_dirs"]]
        cfgs = [json.loads((Path(d) / "result.json").read_text())["config"] for d in v["run_dirs"]]
        assert sorted(c["train"]["seed"] for c in cfgs) == [0, 1]
        if v["technique"] == "swiglu":
            assert all(c["model"]["mlp"] == "relu2" for c in cfgs) and v["off"] == {"model.mlp": "relu2"}
        else:
            assert all(c["model"]["value_proj"] is False and c["model"]["mlp"] == "swiglu" for c in cfgs)
        want = statistics.fmean(t for t, _ in losses) - statistics.fmean(t for t, _ in full)
        assert v["delta_test"] == pytest.approx(want, abs=1e-12)
        assert v["delta_val"] == pytest.approx(statistics.fmean(x for _, x in losses) - statistics.fmean(x for _, x in full), abs=1e-12)
        assert 0.0 <= v["p_hurts"] <= 1.0
        assert v["p_hurts_val"] == pytest.approx(stats.ttest_ind([x for _, x in losses], [x for _, x in full], equal_var=False,
                                                                 alternative="greater").pvalue, rel=1e-9)
        assert v["wall_s"] > 0
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 8
    # a rerun through the CLI trains nothing and prints the same table
    mtimes = {d: (Path(d) / "result.json").stat().st_mtime for v in [saved["full"]] + saved["variants"] for d in v["run_dirs"]}
    r = subprocess.run([sys.executable, "-m", "slowrun", "ablate", "--recipe", "smoke", "--data", str(bpe_ds), "--out", str(out),
                        "--seeds", "2", "--only", "value_proj,swiglu", "--set", "train.max_steps=3", "--variant",
                        "wd0:optim.weight_decay=0.0", "--equal-time", "--threads", "1", "--no-progress"],
                       capture_output=True, text=True)  # the step times come from equal_time.json: no timing, no new run
    assert r.returncode == 0, r.stderr
    assert "8 runs (8 already finished" in r.stdout and "to train" not in r.stdout
    assert all((Path(d) / "result.json").stat().st_mtime == t for d, t in mtimes.items())
    again = json.loads((out / "ablation.json").read_text())
    assert [v["delta_test"] for v in again["variants"]] == [v["delta_test"] for v in saved["variants"]]
    assert "value_proj" in r.stdout and "model.mlp=relu2" in r.stdout and "optim.weight_decay=0.0" in r.stdout
    assert again["finished"] == again["runs"] == 8 and "partial" not in r.stdout


def test_no_train_writes_the_table_of_what_finished(bpe_ds, tmp_path):
    """An ablation measured over several sessions: --no-train tabulates the runs finished so far
    (here none, then one), trains nothing and says the table is partial."""
    out = tmp_path / "ab"
    common = dict(seeds=2, only=["value_proj"], threads=1, fixed={"train.max_steps": 2}, progress=False,
                  ledger=str(tmp_path / "ledger.jsonl"))
    ab = ablate(AblateConfig("smoke", str(bpe_ds), str(out), train=False, **common))
    assert ab["finished"] == 0 and ab["runs"] == 4 and not (out / "runs").exists()
    assert ab["full"]["test_mean"] is None and ab["variants"][0]["delta_test"] is None
    from slowrun.config import build_config as bc
    from slowrun.train import train

    seed0 = Path(ab["full"]["run_dirs"][0])
    train(bc("smoke", {"train.max_steps": 2, "data.path": str(bpe_ds), "train.seed": 0, "train.num_threads": 1}), seed0,
          echo=False)
    r = subprocess.run([sys.executable, "-m", "slowrun", "ablate", "--recipe", "smoke", "--data", str(bpe_ds), "--out",
                        str(out), "--seeds", "2", "--only", "value_proj", "--set", "train.max_steps=2", "--threads", "1",
                        "--no-train", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["finished"] == 1 and saved["full"]["test_losses"] == [_test_loss(seed0)[0]]
    assert "partial: 1 of 4 runs finished" in r.stdout and len(list((out / "runs" / "1x").iterdir())) == 1
    # the table's cost is its runs' walls, not the seconds this call took to tabulate them
    seed0_wall = json.loads((seed0 / "result.json").read_text())["wall_s"]
    assert saved["runs_wall_s"] == pytest.approx(seed0_wall, abs=0.05 + 1e-9) and "wall_s" not in saved  # rounded to 0.1 s
    assert ab["runs_wall_s"] == 0 and 0 <= saved["wall_s_this_invocation"] < 60
    # placed on a curve (one with no dataset fingerprint is taken as given): interpolated where the curve
    # reaches the loss (halfway from 1x to 2x: 1.5x), extrapolated on its power-law fit and marked so where not
    x = _test_loss(seed0)[0]
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"name": "mini", "budget": 1000, "tokens": [1000, 2000, 4000],
                                 "losses": {"test": [x + 1.0, x - 1.0, x - 1.5]}}))
    placed = ablate(AblateConfig("smoke", str(bpe_ds), str(out), train=False, curve=str(curve), **common))
    assert placed["full"]["efficiency"] == pytest.approx(1.5) and not placed["full"]["efficiency_extrapolated"]
    assert placed["variants"][0]["efficiency"] is None and placed["variants"][0]["efficiency_error"] == "no finished run"
    curve.write_text(json.dumps({"name": "mini", "budget": 1000, "tokens": [1000, 2000, 4000, 8000],
                                 "losses": {"test": [x - 1 + 4 / d**0.5 for d in (1, 2, 4, 8)]}}))  # reaches x at 16x
    beyond = ablate(AblateConfig("smoke", str(bpe_ds), str(out), train=False, curve=str(curve), **common))["full"]
    assert beyond["efficiency_extrapolated"] and beyond["efficiency_fit"]["status"] == "ok"
    assert beyond["efficiency"] == pytest.approx(16, rel=0.05)
    # with three points the fit would pass through each exactly: no estimate, and the reason
    curve.write_text(json.dumps({"name": "mini", "budget": 1000, "tokens": [1000, 2000, 4000],
                                 "losses": {"test": [x - 1 + 4 / d**0.5 for d in (1, 2, 4)]}}))
    three = ablate(AblateConfig("smoke", str(bpe_ds), str(out), train=False, curve=str(curve), **common))["full"]
    assert three["efficiency"] is None and "at least 4 points" in three["efficiency_error"]


def test_bad_only_is_one_line(bpe_ds, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slowrun", "ablate", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--out", str(tmp_path / "x"), "--only", "value_proj,warp_drive"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--only warp_drive: not a technique" in r.stderr
    r = subprocess.run([sys.executable, "-m", "slowrun", "ablate", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--out", str(tmp_path / "x"), "--variant", "soap=optim.matrix_optimizer"], capture_output=True, text=True)
    assert r.returncode == 2 and "expected NAME:key=value" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(AblateError, match="--only dropout: not on in this recipe"):  # smoke trains without dropout
        techniques_on(build_config("smoke"), ["dropout"])
    assert not (tmp_path / "x").exists()


def test_a_failed_run_fails_the_ablation(bpe_ds, tmp_path):
    """issue 35, item 1: a swap whose run fails (a sequence longer than the val split) makes the
    ablation exit non-zero naming that run on one line, no traceback, after writing and printing
    the table of the runs that finished (the failed row carries its error)."""
    out = tmp_path / "ab"
    r = subprocess.run([sys.executable, "-m", "slowrun", "ablate", "--recipe", "smoke", "--data", str(bpe_ds), "--out",
                        str(out), "--seeds", "1", "--only", "none", "--variant",
                        "long:model.seq_len=16384,train.batch_tokens=16384", "--set", "train.max_steps=2", "--threads", "1",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    (named,) = [line for line in r.stderr.splitlines() if "seq_len=16384" in line]
    assert named.strip().startswith(str(out / "runs" / "1x")) and "val" in named, r.stderr
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["full"]["seeds"] == 1 and saved["variants"][0]["errors"] and saved["variants"][0]["test_mean"] is None
    assert "1 failed" in r.stdout  # the table was printed


def test_report_draws_the_ablation(tmp_path):
    from slowrun.report import ReportError, build_report

    def rec(name, losses, **kw):
        return {"technique": name, "test_losses": losses, "test_mean": statistics.fmean(losses), "test_std": statistics.stdev(losses),
                "val_mean": statistics.fmean(losses) + 0.01, "seeds": len(losses), "efficiency": None, **kw}

    ab = {"format": "slowrun-ablation/1", "recipe": "smoke", "seeds": 2, "full": rec("full", [3.0, 3.1]),
          "variants": [rec("unet", [3.2, 3.3], delta_test=0.2, p_hurts=0.04), rec("ema", [2.9, 3.0], delta_test=-0.1, p_hurts=0.9),
                       rec("soap", [2.8, 2.9], delta_test=-0.2, p_better=0.02, swap=True, efficiency=1.5,
                           efficiency_extrapolated=True)]}
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "ablation.json").write_text(json.dumps(ab))
    page = build_report([], tmp_path / "rep", ablation=str(tmp_path / "ab"))
    text = page.read_text()
    assert (tmp_path / "rep" / "ablation.png").stat().st_size > 1000 and "Ablation: smoke" in text
    assert "<td>unet</td><td>3.2500</td>" in text and "<td>0.0400</td>" in text and "<h2>Runs</h2>" not in text
    # a swap is named as one, with its own p (that it helps) and its efficiency marked as extrapolated
    assert "<td>soap (swap)</td><td>2.8500</td>" in text and "<td>0.0200</td>" in text and "1.50x (extrapolated)" in text
    assert "Partial" not in text  # no run counts: a table of finished runs
    # written before every run finished (--no-train): the page says so
    (tmp_path / "ab" / "ablation.json").write_text(json.dumps({**ab, "runs": 9, "finished": 6}))
    assert "<b>Partial</b>: 6 of 9 runs finished" in build_report([], tmp_path / "rep3", ablation=str(tmp_path / "ab")).read_text()
    (tmp_path / "ab" / "ablation.json").write_text(json.dumps({**ab, "runs": 9, "finished": 9}))
    assert "Partial" not in build_report([], tmp_path / "rep4", ablation=str(tmp_path / "ab")).read_text()
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ReportError, match="not an ablation.json"):
        build_report([], tmp_path / "rep2", ablation=str(tmp_path / "bad.json"))


def test_ablate_has_help(capsys):
    from slowrun.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ablate", "--help"])
    assert e.value.code == 0 and "--only A,B" in capsys.readouterr().out


def test_equal_time_scales_each_swap_by_measured_step_times(tmp_path):
    """A swap twice as slow per step trains half the steps (or epochs), however loaded the machine
    is: the full recipe is timed round-robin beside the swaps, and a swap added later is timed
    beside a fresh timing of the full recipe. The step times are kept, so a rerun plans the same
    runs without timing again."""
    times = {(): 0.2, (("optim.matrix_optimizer", "soap"),): 0.4, (("optim.matrix_optimizer", "kl_shampoo"),): 0.3,
             (("data.curriculum", "easy_to_hard"),): 0.25}
    calls = []
    load = {"x": 1.0}  # the machine's load: every step time is multiplied by it

    def fake(recipe, data, overrides, dtype, threads):
        calls.append(overrides)
        return load["x"] * times[tuple(sorted((k, v) for k, v in overrides.items() if k != "train.max_steps"))]

    from slowrun import ablate as ab_mod

    swaps = {"soap": {"optim.matrix_optimizer": "soap"}, "e2h": {"data.curriculum": "easy_to_hard"}}
    cfg = AblateConfig("smoke", "unused", str(tmp_path / "ab"), fixed={"train.max_steps": 8}, variants=swaps, equal_time=True)
    base = build_config("smoke", {"train.max_steps": 8})
    over, step_s = ab_mod.equal_time_overrides(cfg, base, fake)
    # a curriculum computes the recipe's steps: not timed (0.25 would be noise), its length kept
    assert over == {"soap": {"optim.matrix_optimizer": "soap", "train.max_steps": 4},
                    "e2h": {"data.curriculum": "easy_to_hard"}}
    assert step_s == {"soap": {"step_s": 0.4, "full_step_s": 0.2}}
    assert calls == [{"train.max_steps": 8}, {"train.max_steps": 8, "optim.matrix_optimizer": "soap"}] * ab_mod.EQUAL_TIME_ROUNDS
    n = len(calls)
    assert ab_mod.equal_time_overrides(cfg, base, fake) == (over, step_s) and len(calls) == n  # from equal_time.json
    # a swap added later, on a machine 1.5x as loaded: timed beside the full recipe again, so 0.3 / 0.2
    load["x"] = 1.5
    more = AblateConfig("smoke", "unused", str(tmp_path / "ab"), fixed={"train.max_steps": 8},
                        variants={**swaps, "kl": {"optim.matrix_optimizer": "kl_shampoo"}}, equal_time=True)
    over_more, step_more = ab_mod.equal_time_overrides(more, base, fake)
    assert over_more["kl"]["train.max_steps"] == round(8 * 0.2 / 0.3) and over_more["soap"] == over["soap"]
    assert step_more["kl"] == {"step_s": pytest.approx(0.45), "full_step_s": pytest.approx(0.3)}
    assert len(calls) == n + 2 * ab_mod.EQUAL_TIME_ROUNDS  # only the new swap and the full recipe timed
    # without max_steps the recipe's epochs are scaled
    cfg2 = AblateConfig("slowrun", "unused", str(tmp_path / "ab2"), variants={"soap": swaps["soap"]}, equal_time=True)
    base2 = build_config("slowrun", {})
    assert base2.train.max_steps == -1
    from slowrun.distributed import CPU_BF16_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CPU_BF16_ENV, "1")  # the recipe's bf16 computed in bf16, on any CPU
        over2, _ = ab_mod.equal_time_overrides(cfg2, base2, fake)
    assert over2["soap"]["train.epochs"] == pytest.approx(base2.train.epochs / 2)
    # where bf16 has no hardware the runs train in fp32: that is what is timed, and kept apart
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CPU_BF16_ENV, "0")
        seen = []
        assert base2.train.dtype == "bf16"
        ab_mod.equal_time_overrides(cfg2, base2, lambda *a: seen.append(a[3]) or fake(*a))
        assert set(seen) == {"fp32"}
        kept = json.loads((tmp_path / "ab2" / "equal_time.json").read_text())["step_s"]
        assert sorted(e["dtype"] for e in kept.values()) == ["bf16", "fp32"]
    with pytest.raises(AblateError, match="sets train.epochs"):
        ab_mod.equal_time_overrides(AblateConfig("slowrun", "unused", str(tmp_path / "ab3"), variants={"x": {"train.epochs": 2.0}},
                                                 equal_time=True), base2, fake)
    # kept where told (a committed file): another output directory plans the same lengths without timing
    elsewhere = AblateConfig("smoke", "unused", str(tmp_path / "other"), fixed={"train.max_steps": 8}, variants=swaps,
                             equal_time=True, equal_time_file=str(tmp_path / "ab" / "equal_time.json"))
    n = len(calls)
    assert ab_mod.equal_time_overrides(elsewhere, base, fake) == (over, step_s) and len(calls) == n
    assert techniques_on(base2, ["none"]) == []  # --only none: the swaps alone
    # a file of the first format (each config timed alone, at its own time) is timed again, beside the full recipe
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "slowrun-equal-time/1", "step_s": {"x": {"step_s": 9.0}}}))
    load["x"] = 1.0
    ab_mod.equal_time_overrides(AblateConfig("smoke", "unused", str(tmp_path / "o"), fixed={"train.max_steps": 8}, variants=swaps,
                                             equal_time=True, equal_time_file=str(old)), base, fake)
    assert len(calls) == n + 2 * ab_mod.EQUAL_TIME_ROUNDS
    assert json.loads(old.read_text())["format"] == ab_mod.EQUAL_TIME_FORMAT and "x" not in json.loads(old.read_text())["step_s"]
    # --no-train times nothing: a swap with no kept time (here: at other --threads) is named, not timed
    n = len(calls)
    kept = AblateConfig("smoke", "unused", str(tmp_path / "ab"), fixed={"train.max_steps": 8}, variants=swaps,
                        equal_time=True, train=False)
    assert ab_mod.equal_time_overrides(kept, base, fake) == (over, step_s)
    with pytest.raises(AblateError, match=r"no step times of soap at --threads 2, .*holds --threads -1"):
        ab_mod.equal_time_overrides(dataclasses.replace(kept, threads=2), base, fake)
    assert len(calls) == n
    (tmp_path / "ab" / "equal_time.json").write_text("{not json")
    with pytest.raises(AblateError, match="equal_time.json: corrupt, not valid JSON at line 1"):
        ab_mod.equal_time_overrides(cfg, base, fake)


def test_equal_time_is_keyed_by_the_configs_timed_not_the_overrides_asked(tmp_path):
    """An edited recipe is timed again (its old times are of other configs); an override that pins
    the edited value back resolves to the configs timed, and finds their times without timing."""
    from slowrun import ablate as ab_mod
    from importlib import resources

    calls = []

    def fake(recipe, data, overrides, dtype, threads):
        calls.append(overrides)
        return 0.2 if "optim.matrix_optimizer" in overrides else 0.1

    recipe = tmp_path / "r.toml"
    text = (resources.files("slowrun.recipes") / "smoke.toml").read_text()
    assert "tie_embeddings = false" in text
    recipe.write_text(text)
    times = tmp_path / "equal_time.json"

    def plan(fixed):
        cfg = AblateConfig(str(recipe), "unused", str(tmp_path / "ab"), fixed={"train.max_steps": 8, **fixed},
                           variants={"soap": {"optim.matrix_optimizer": "soap"}}, equal_time=True, equal_time_file=str(times))
        return ab_mod.equal_time_overrides(cfg, build_config(str(recipe), cfg.fixed), fake)

    first = plan({})
    assert first[0]["soap"]["train.max_steps"] == 4 and len(calls) == 2 * ab_mod.EQUAL_TIME_ROUNDS
    recipe.write_text(text.replace("tie_embeddings = false", "tie_embeddings = true"))
    plan({})
    assert len(calls) == 4 * ab_mod.EQUAL_TIME_ROUNDS  # the edited recipe's configs were never timed
    n = len(calls)
    assert plan({"model.tie_embeddings": False}) == first and len(calls) == n  # pinned back: the first times
    saved = json.loads(times.read_text())
    assert saved["format"] == ab_mod.EQUAL_TIME_FORMAT and len(saved["step_s"]) == 2
    # a file of the second format (keyed by the overrides asked for) is timed again
    times.write_text(json.dumps({"format": "slowrun-equal-time/2", "step_s": {"x": {"step_s": 9.0, "full_step_s": 9.0}}}))
    plan({})
    assert len(calls) == n + 2 * ab_mod.EQUAL_TIME_ROUNDS and "x" not in json.loads(times.read_text())["step_s"]


def test_equal_time_of_a_batch_swap_is_equal_wall_time_per_epoch(bpe_ds, tmp_path):
    """Half the batch: twice the steps an epoch; at 0.6x the step time an epoch takes 1.2x the
    wall time, so the swap trains 1/1.2 of the recipe's epochs (not 1/0.6 of them)."""
    from slowrun import ablate as ab_mod
    from slowrun.dataset import Dataset
    from slowrun.loader import TrainLoader

    by_epochs = {"train.max_steps": -1}
    base = build_config("smoke", {**by_epochs, "data.path": str(bpe_ds)})
    half = base.train.batch_tokens // 2
    fake = lambda recipe, data, overrides, dtype, threads: 0.06 if "train.batch_tokens" in overrides else 0.1  # noqa: E731
    cfg = AblateConfig("smoke", str(bpe_ds), str(tmp_path / "ab"), fixed=by_epochs,
                       variants={"half": {"train.batch_tokens": half}}, equal_time=True)
    over, _ = ab_mod.equal_time_overrides(cfg, base, fake)
    # the steps per epoch as the trainer's loader counts them, at each batch
    T = base.model.seq_len
    spe = [TrainLoader(Dataset.open(bpe_ds), T, b // T).seqs_per_epoch / (b // T) for b in (base.train.batch_tokens, half)]
    assert spe[1] == pytest.approx(2 * spe[0], rel=0.02)
    want = base.train.epochs * (0.1 * spe[0]) / (0.06 * spe[1])
    assert over["half"]["train.epochs"] == pytest.approx(want, abs=1e-3)
    assert over["half"]["train.epochs"] < base.train.epochs  # slower per epoch: fewer epochs


def test_step_time_is_the_trainers_median(bpe_ds):
    from slowrun.ablate import step_time

    t = step_time("smoke", str(bpe_ds), {}, "fp32", 1)
    assert 0 < t < 60
    with pytest.raises(AblateError, match="timing a step of smoke"):
        step_time("smoke", str(bpe_ds), {"model.no_such_key": 1}, "fp32", 1)


def test_a_recipe_swap_trains_the_other_recipe_at_its_own_length(bpe_ds, tmp_path, monkeypatch):
    """`recipe=OTHER` in a swap: its runs are OTHER's config (with the swap's and the fixed
    overrides), not timed by --equal-time (its length is its own), and in the ledger under
    OTHER; a rerun finds them there."""
    other = tmp_path / "wider.toml"
    other.write_text('extends = "smoke"\n[model]\nn_embd = 48\n[optim]\nweight_decay = 0.0\n')
    timed = []
    monkeypatch.setattr("slowrun.ablate.step_time", lambda r, d, over, dtype, th: timed.append(r) or 0.1)
    cfg = AblateConfig("smoke", str(bpe_ds), str(tmp_path / "ab"), seeds=2, only=["none"], fixed={"train.max_steps": 2},
                       progress=False, ledger=str(tmp_path / "ledger.jsonl"), equal_time=True,
                       variants={"wider": {"recipe": str(other), "optim.lr": 0.02}})
    ab = ablate(cfg)
    assert timed == []  # nothing to time: the only swap is a recipe of its own length
    swap = ab["variants"][0]
    assert swap["technique"] == "wider" and swap["swap"] and swap["seeds"] == 2 and swap["off"]["recipe"] == str(other)
    for d in swap["run_dirs"]:
        c = json.loads((Path(d) / "result.json").read_text())["config"]
        assert (c["model"]["n_embd"], c["optim"]["weight_decay"], c["optim"]["lr"], c["train"]["max_steps"]) == (48, 0.0, 0.02, 2)
        assert Path(d).name.startswith("wider_")
    for d in ab["full"]["run_dirs"]:
        assert json.loads((Path(d) / "result.json").read_text())["config"]["model"]["n_embd"] == 32
    lines = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert sorted(x["tag"]["recipe"] for x in lines) == [str(other)] * 2 + ["smoke"] * 2
    again = ablate(dataclasses.replace(cfg, out=str(tmp_path / "elsewhere")))  # from the ledger: no run trained
    assert again["variants"][0]["test_losses"] == swap["test_losses"]
    assert not list((tmp_path / "elsewhere" / "runs").rglob("result.json"))
    with pytest.raises(Exception, match="unknown recipe 'nosuch'"):
        ablate(dataclasses.replace(cfg, variants={"x": {"recipe": "nosuch"}}))


def test_equal_time_of_a_loop_that_starts_late_counts_its_looped_epochs(tmp_path):
    """A swap looping from epoch 4 runs its first steps unlooped, the ones timed: it is timed looped
    too, and gets the epochs whose unlooped and looped parts take the full recipe's time. Here the
    full recipe's 8 epochs at 1.0 s a step; the swap 1.0 s unlooped, 2.0 s looped: 4 + 4 / 2 = 6."""
    from slowrun import ablate as ab_mod

    calls = []

    def fake(recipe, data, overrides, dtype, threads):
        calls.append(dict(overrides))
        looped_now = overrides.get("model.loop_start", -1) >= 0 and overrides.get("model.loop_from_epoch") == 0
        return 2.0 if looped_now else 1.0

    loop = {"model.loop_start": 2, "model.loop_end": 2, "model.loop_repeats": 3, "model.loop_from_epoch": 4}
    base = build_config("slowrun", {})
    cfg = AblateConfig("slowrun", "unused", str(tmp_path / "ab"), variants={"loop": loop, "wd": {"optim.weight_decay": 0.4}},
                       equal_time=True)
    over, times = ab_mod.equal_time_overrides(cfg, base, fake)
    assert base.train.epochs == 8 and over["loop"]["train.epochs"] == 6.0 and over["wd"]["train.epochs"] == 8.0
    assert times["loop"] == {"step_s": 1.0, "full_step_s": 1.0, "looped_step_s": 2.0}
    assert {**loop, "model.loop_from_epoch": 0} in calls  # timed looped from the first step
    n = len(calls)
    assert ab_mod.equal_time_overrides(cfg, base, fake) == (over, times) and len(calls) == n  # kept
    # a time kept without the looped step (an earlier version's) is timed again
    saved = json.loads((tmp_path / "ab" / "equal_time.json").read_text())
    for e in saved["step_s"].values():
        e.pop("looped_step_s", None)
    (tmp_path / "ab" / "equal_time.json").write_text(json.dumps(saved))
    assert ab_mod.equal_time_overrides(cfg, base, fake)[0] == over and len(calls) > n
    # a loop switched on after the swap's whole time: never reached, all epochs unlooped
    assert ab_mod._epochs_at_equal_time(8, {"step_s": 2.0, "full_step_s": 1.0, "looped_step_s": 3.0}, 0, 5, 10, 10) == 4.0
    # the full recipe loops late too: its time summed the same way (4 x 1 + 4 x 2 = 12 epochs' worth at 1.0 s)
    assert ab_mod._epochs_at_equal_time(8, {"step_s": 1.0, "full_step_s": 1.0, "full_looped_step_s": 2.0}, 4, 0, 10, 10) == 12.0
    with pytest.raises(AblateError, match="train.max_steps are not"):
        ab_mod.equal_time_overrides(dataclasses.replace(cfg, fixed={"train.max_steps": 8}), build_config("slowrun", {"train.max_steps": 8}), fake)
