"""The CPU track runner end to end, on a miniature track definition."""

import json
from pathlib import Path

import pytest

from slowrun.track import Entry, TrackDef, TrackError, run_track
from tests.conftest import with_field_added_later


def test_track_pipeline_end_to_end(tmp_path):
    gpt2 = tmp_path / "gpt2_curve.json"  # a second comparator, as the committed GPT-2 curve is
    gpt2.write_text(json.dumps({"name": "mini gpt2", "budget": 20_000, "tokens": [20_000, 40_000, 60_000],
                                "losses": {"test": [9.0, 8.0, 7.5]}}))
    t = TrackDef(name="mini", tokenizer="bpe:400", budget=20_000, val_tokens=4_000, test_tokens=4_000, budgets=[1, 2, 3],
                 curve_recipe="nanochat", curve_grid={"model.depth": [1, 2]}, curve_grid_by_budget={},
                 curve_expand="",  # expansion is covered by the sweep's test; here a fixed grid keeps the test short
                 curve_fixed={"model.seq_len": 32, "model.aspect_ratio": 16, "model.head_dim": 16,
                              "train.batch_tokens": 1024, "eval.max_tokens": 512,
                              "train.compile_loss": False},  # as smoke: the kernel's build costs more than it saves here
                 curve_refine={3: {"optim.lr_scale": [2.0]}}, curve_seeds=2, gpt2_curve=str(gpt2),
                 single=Entry("smoke", {"train.max_steps": 6, "eval.max_tokens": 512}),
                 ensemble=Entry("smoke", {"train.max_steps": 6, "eval.max_tokens": 512}, members=2),
                 distill=Entry("smoke", {"train.max_steps": 6, "eval.max_tokens": 512}, members=2, distill=True))
    out = tmp_path / "cpu_track.json"
    res = run_track(t, tmp_path / "work", out, tmp_path / "report", parts=("baseline", "single", "ensemble", "distill"),
                    jobs=2, threads=1)
    saved = json.loads(out.read_text())
    assert {"baseline_curve", "gpt2_curve", "single", "ensemble", "machine", "track"} <= set(saved)
    bc = saved["baseline_curve"]
    assert bc["tokens"] == [20_000, 40_000, 60_000] and bc["recipe"] == "nanochat"
    # each curve's power-law fit is reported, needed or not: with 3 budgets, no fit (3 parameters pass
    # through any 3 points), and why
    for fit in (bc["fit"], saved["gpt2_curve"]["fit"]):
        assert fit["metric"] == "test" and fit["status"].startswith("no fit") and "at least 4 points" in fit["status"]
    for c in bc["chosen"]:  # each curve point is the mean of 2 seeds
        assert c["seeds"] == 2 and c["test_loss"] == pytest.approx(sum(c["test_losses"]) / 2)
    assert any(p["phase"] == "refine" and p["budget"] == 3 for p in bc["points"])
    committed = json.loads((tmp_path / "curves" / "cpu_nanochat.json").read_text())
    assert committed["losses"] == bc["losses"] and "run_dir" not in json.dumps(committed)
    assert "run_dir" not in json.dumps(bc) and all("config" not in p for p in bc["points"])  # the ledger has them
    ledger = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == sum(p["val_loss"] is not None for p in bc["points"])
    for kind in ("single", "ensemble"):
        s = saved[kind]
        for key in ("test_loss", "test_bpb", "val_loss", "efficiency", "members", "wall_s", "tokens_per_s", "peak_rss_mb",
                    "resolved_recipe"):
            assert key in s, (kind, key)
        # placed on the curve, or (outside its range, where 3 budgets give no fit) refused with the reason, never clamped
        assert (isinstance(s["efficiency"], float) and s["efficiency"] > 0) or "at least 4 points" in s["efficiency_error"]
        assert s["efficiency_second"]["curve"] == "mini gpt2" and "efficiency" in s["efficiency_second"]
    assert saved["ensemble"]["members"] == 2 and len(saved["ensemble"]["per_k"]) == 2
    # the allowance is clock time: the members all trained in this call, so their elapsed time is known and counts
    ens, single = saved["ensemble"], saved["single"]
    assert ens["limit_basis"] == "elapsed" and ens["within_limit"] == (ens["members_elapsed_s"] <= ens["limit_s"])
    assert single["limit_basis"] == "wall" and single["members_elapsed_s"] is None
    # each averaging method is placed on the curve; the probability average is the entry's own number
    by_method = saved["ensemble"]["efficiency_by_method"]
    assert set(by_method) >= {"probs", "logits"} and by_method["probs"]["efficiency"] == saved["ensemble"]["efficiency"]
    assert saved["ensemble"]["efficiency_by_k"][-1]["efficiency"] == saved["ensemble"]["efficiency"]
    # the single entry has the ensemble's recipe and overrides, so it is the ensemble's first member, not a rerun
    assert saved["single"]["run_dir"] == str(tmp_path / "work" / "ensemble" / Path(saved["ensemble"]["run_dir"]).name /
                                             "member_0")
    first = json.loads((Path(saved["single"]["run_dir"]) / "result.json").read_text())
    assert saved["single"]["test_loss"] == first["test_loss"]
    assert not (tmp_path / "work" / "single").exists()
    # the distilled chain starts from that same teacherless first member; its second member learns from it
    d = saved["distill"]
    assert d["distill"] and d["members"] == 2
    assert d["per_k"][0]["probs_test_loss"] == pytest.approx(saved["ensemble"]["per_k"][0]["probs_test_loss"])
    second = json.loads((Path(d["run_dir"]) / "member_1" / "result.json").read_text())
    assert second["config"]["distill"]["teacher"].startswith(str(Path(d["run_dir"]) / "member_0"))
    page = (tmp_path / "report" / "index.html").read_text()  # the entries placed from the results file
    assert (tmp_path / "report" / "track_curves.png").is_file() and f"{saved['single']['test_loss']:.4f}" in page
    # cached: a second invocation trains nothing new and gives the same numbers
    again = run_track(t, tmp_path / "work", out, tmp_path / "report", parts=("single",), jobs=2, threads=1)
    assert again["single"]["test_loss"] == res["single"]["test_loss"]
    # a fresh clone: a new work directory, the committed ledger beside the results -> the curve trains nothing
    fresh = run_track(t, tmp_path / "fresh-work", out, tmp_path / "report", parts=("baseline",), jobs=2, threads=1)
    assert not (tmp_path / "fresh-work" / "nanochat-curve" / "runs").exists()
    assert fresh["baseline_curve"]["losses"] == bc["losses"]
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == len(ledger)
    # the curve as the ledger has it, training nothing: with 3x's lines missing, 1x and 2x make the curve
    # and 3x is named as pending (the curve used while it is measured over several sessions)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ledger.jsonl").write_text("".join(line + "\n" for line in ledger if json.loads(line)["tag"]["budget"] != 3))
    part = run_track(t, tmp_path / "partial-work", partial / "cpu_track.json", partial / "report", parts=("baseline",),
                     train_curve=False)
    assert not (tmp_path / "partial-work" / "nanochat-curve" / "runs").exists()
    assert part["baseline_curve"]["tokens"] == [20_000, 40_000]
    assert part["baseline_curve"]["losses"]["test"] == bc["losses"]["test"][:2]
    assert part["baseline_curve"]["pending"] == {"3x": "grid, 2 run(s) to train"}
    assert json.loads((partial / "curves" / "cpu_nanochat.json").read_text())["pending"] == {"3x": "grid, 2 run(s) to train"}
    assert "pending" not in run_track(t, tmp_path / "fresh-work", out, tmp_path / "report", parts=("baseline",),
                                      train_curve=False)["baseline_curve"]  # every budget finished: the whole curve
    # one budget at a time (the curve measured over several sessions): from the ledger, nothing else written
    before = out.read_text()
    one = run_track(t, tmp_path / "fresh-work", out, tmp_path / "report", parts=("baseline",), budgets=[2])
    assert [c["budget"] for c in one["chosen"]] == [2] and one["chosen"][0]["test_loss"] == bc["chosen"][1]["test_loss"]
    assert out.read_text() == before and not (tmp_path / "fresh-work" / "nanochat-curve" / "runs").exists()
    with pytest.raises(TrackError, match="not budgets of the track"):
        run_track(t, tmp_path / "fresh-work", out, tmp_path / "report", parts=("baseline",), budgets=[5])
    # entries are placed again on a changed curve from their stored losses, without retraining
    shifted = {**committed, "losses": {k: [x - 5 for x in v] for k, v in committed["losses"].items()}}
    (tmp_path / "curves" / "cpu_nanochat.json").write_text(json.dumps(shifted))
    moved = run_track(t, tmp_path / "fresh-work", out, tmp_path / "report", parts=(), jobs=2, threads=1)
    assert moved["single"]["efficiency"] is None or moved["single"]["efficiency_extrapolated"]
    assert moved["single"]["test_loss"] == res["single"]["test_loss"]
    # a curve built around the single entry's stored loss: halfway from the 1x to the 2x point, so 1.5x by construction
    x = res["single"]["test_loss"]
    around = {**committed, "losses": {k: [x + 0.5, x - 0.5, x - 1.0] for k in committed["losses"]}}
    (tmp_path / "curves" / "cpu_nanochat.json").write_text(json.dumps(around))
    placed = run_track(t, tmp_path / "fresh-work", out, tmp_path / "report", parts=(), jobs=2, threads=1)
    assert placed["single"]["efficiency"] == pytest.approx(1.5) and not placed["single"]["efficiency_extrapolated"]
    # a fresh clone asked for the entries: each is in the committed results under its key, so none is trained
    kept = run_track(t, tmp_path / "clone-work", out, tmp_path / "report", parts=("single", "ensemble", "distill"))
    assert not (tmp_path / "clone-work" / "ensemble").exists() and not (tmp_path / "clone-work" / "distill").exists()
    assert [kept[k]["test_loss"] for k in ("single", "ensemble", "distill")] == [res[k]["test_loss"] for k in
                                                                                ("single", "ensemble", "distill")]
    # a single entry whose run another ledger beside the results holds (an ablation's run of the same config)
    # is read from it: not trained, and the summary says which line
    from slowrun.ledger import entry_from_result
    from slowrun.results import read_result

    other = tmp_path / "other"
    (other / "curves").mkdir(parents=True)
    (other / "curves" / "cpu_nanochat.json").write_text(json.dumps(around))
    line = entry_from_result(read_result(saved["single"]["run_dir"]), {"sweep": "ablate-smoke"})
    (other / "ablation_ledger.jsonl").write_text(json.dumps(line) + "\n")
    read = run_track(t, tmp_path / "other-work", other / "cpu_track.json", other / "report", parts=("single",))
    assert read["single"]["test_loss"] == res["single"]["test_loss"] and not (tmp_path / "other-work" / "single").exists()
    assert read["single"]["ledger"] == f"{other / 'ablation_ledger.jsonl'}:1"
    # its run trained on one thread beside other jobs (an ablation's): the allowance is checked on a run of
    # the same config but its seed on the track's 2 threads; without one, on its own wall
    from slowrun.ledger import config_key

    slow = {**line, "threads": 1, "wall_s": 10_000.0}
    timed = {**line, "threads": 2, "wall_s": 100.0, "seed": 1,
             "config": {**line["config"], "train": {**line["config"]["train"], "seed": 1}}}
    timed["key"] = config_key(timed["config"])
    other_seed = {**timed, "wall_s": 5.0, "config": {**timed["config"], "model": {**timed["config"]["model"], "n_layer": 9}}}
    other_seed["key"] = config_key(other_seed["config"])  # another config: never the timing
    (other / "cpu_track.json").unlink()
    (other / "ablation_ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in (slow, other_seed, timed)))
    read = run_track(t, tmp_path / "other-work", other / "cpu_track.json", other / "report", parts=("single",))
    s1 = read["single"]
    assert s1["within_limit"] and s1["wall_s"] == 10_000.0 and s1["limit_basis"].startswith("wall of seed 1's run on 2 threads")
    assert s1["limit_basis"].endswith("ablation_ledger.jsonl:3): 1.7 min")
    (other / "cpu_track.json").unlink()
    (other / "ablation_ledger.jsonl").write_text(json.dumps(slow) + "\n")
    alone = run_track(t, tmp_path / "other-work", other / "cpu_track.json", other / "report", parts=("single",))["single"]
    assert not alone["within_limit"] and alone["limit_basis"] == "wall"
    # a single entry in no ledger is trained and appended to the track's ledger, where the next machine finds it
    import dataclasses

    t5 = dataclasses.replace(t, single=Entry("smoke", {"train.max_steps": 5, "eval.max_tokens": 512}))
    trained = run_track(t5, tmp_path / "other-work", other / "cpu_track.json", other / "report", parts=("single",))
    assert "ledger" not in trained["single"] and (tmp_path / "other-work" / "single").is_dir()
    assert [json.loads(x)["steps"] for x in (other / "ledger.jsonl").read_text().splitlines()] == [5]
    (other / "cpu_track.json").unlink()  # no stored entry: only the ledger can answer
    again5 = run_track(t5, tmp_path / "other-work-2", other / "cpu_track.json", other / "report", parts=("single",))
    assert again5["single"]["test_loss"] == trained["single"]["test_loss"] and again5["single"]["ledger"].endswith("ledger.jsonl:1")
    assert not (tmp_path / "other-work-2" / "single").exists()


def test_an_entry_outlives_a_config_field_added_later(bpe_ds, tmp_path, monkeypatch):
    """An entry's run directory is named by its config as the ledger keys it: a field a later
    version adds, at its default, leaves the name (and so the finished entry) as it was; set to
    another value, it names another run."""
    from slowrun import track
    from slowrun.dataset import Dataset

    data, e = Dataset.open(bpe_ds), Entry("smoke", {"train.max_steps": 6})
    before = track._entry_dir(tmp_path, "single", e, data)

    def later(value):
        with_field_added_later(monkeypatch, track, value)
        return track._entry_dir(tmp_path, "single", e, data)

    assert later(0) == before and later(3) != before
    assert before != track._entry_dir(tmp_path, "single", Entry("smoke", {"train.max_steps": 7}), data)


def test_ensemble_members_read_from_a_ledger(tmp_path):
    """An ensemble's members that an ablation trained (ledger lines, their run directories still
    here) are copied in, not trained again; one that trained on one thread is timed by a run of
    its config on the track's two threads."""
    from slowrun.ensemble import best_weights
    from slowrun.jobs import TrainJob, run_jobs
    from slowrun.ledger import Ledger, entry_from_result
    from slowrun.report import entry_label
    from slowrun.results import read_result
    from slowrun.rundir import RunDir
    from slowrun.track import run_entry, summarize_entry, track_data

    t = TrackDef(name="mini", tokenizer="bpe:400", budget=20_000, val_tokens=4_000, test_tokens=4_000, budgets=[1])
    data = track_data(t, tmp_path / "work")
    over = {"train.max_steps": 4, "eval.max_tokens": 512}
    ledger = tmp_path / "ablation_ledger.jsonl"
    seeds = [TrainJob(tmp_path / "ablation" / f"seed{s}", "smoke", data.path, {**over, "train.seed": s}) for s in (0, 1)]
    for job, threads in zip(seeds, (1, 2)):
        assert not run_jobs([job], 1, threads, progress=False)
        Ledger.open(ledger).append(entry_from_result(job.result(), {"sweep": "ablate-smoke"}))
    ens = Entry("smoke", over, members=3)
    run_dir, res = run_entry("ensemble", ens, tmp_path / "work", data, 1, 1, None, [ledger], 2)
    members = [RunDir(run_dir).member(k) for k in range(3)]
    for k in (0, 1):  # copied whole but for the checkpoints: the same losses, the same weights
        assert read_result(members[k])["variants"] == seeds[k].result()["variants"]
        assert (members[k] / "model.safetensors").read_bytes() == (seeds[k].run_dir / "model.safetensors").read_bytes()
        assert not (members[k] / "checkpoints").exists() and (seeds[k].run_dir / "checkpoints").exists()
    assert read_result(members[2])["seed"] == 2 and res["members_elapsed_s"] is None  # trained here, after the copies
    by = res["members_timed_by"]
    assert by[1] is None and by[0]["seed"] == by[2]["seed"] == 1 and by[0]["ledger"] == f"{ledger}:2"
    s = summarize_entry("ensemble", ens, run_dir, res)
    walls = [read_result(m)["wall_s"] for m in members]
    one = seeds[1].result()["wall_s"]
    assert s["wall_s"] == res["wall_s"] and s["limit_basis"].startswith("sum of member walls; member 0's on 2 threads")
    assert "member 2's on 2 threads: seed 1's run" in s["limit_basis"]
    # what the allowance counts: member 1's own wall and seed 1's for members 0 and 2 (the members'
    # training, as the elapsed time counts it: the ensemble's evaluation left out)
    assert s["limit_spent_s"] == pytest.approx(walls[1] + 2 * one, abs=0.02)
    # a chain's first member (no teacher) is read from the ledger too; the student is trained
    chain = Entry("smoke", over, members=2, distill=True)
    run_dir, res = run_entry("distill", chain, tmp_path / "work", data, 1, 1, None, [ledger], 2)
    assert read_result(RunDir(run_dir).member(0))["variants"] == seeds[0].result()["variants"]
    assert read_result(RunDir(run_dir).member(1))["config"]["distill"]["teacher"]
    # so are an "ensemble" distillation's teachers; its last member learns from both
    taught = Entry("smoke", over, members=3, distill="ensemble")
    run_dir, res = run_entry("distill", taught, tmp_path / "work", data, 1, 1, None, [ledger], 2)
    teachers = [RunDir(run_dir).member(k) for k in (0, 1)]
    for k, member in enumerate(teachers):
        assert read_result(member)["variants"] == seeds[k].result()["variants"]
    student = read_result(RunDir(run_dir).member(2))
    assert student["seed"] == 2 and student["config"]["distill"]["teacher"].split(",") == [
        str(best_weights(m)) for m in teachers]
    assert entry_label("distill", summarize_entry("distill", taught, run_dir, res)) == \
        "ensemble, its last member distilled from the others"
