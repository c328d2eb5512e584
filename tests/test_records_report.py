import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from slowrun.records import RecordError, check, make_record, welch_one_sided
from slowrun.report import ReportError, build_report, val_by_epoch
from slowrun.results import ResultError
from slowrun.runlog import fmt_time
from slowrun.train import train
from tests.conftest import smoke_config


@pytest.fixture(scope="module")
def seeds(bpe_ds, tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    runs = []
    for s in range(3):
        cfg = smoke_config(bpe_ds, **{"train.max_steps": 6, "train.seed": s, "optim.swa_epochs": 0})
        train(cfg, root / f"s{s}", echo=False)
        runs.append(str(root / f"s{s}"))
    better = []
    for s in range(3):
        cfg = smoke_config(bpe_ds, **{"train.max_steps": 30, "train.seed": s, "optim.matrix_lr": 0.05, "optim.lr": 0.02})
        train(cfg, root / f"b{s}", echo=False)
        better.append(str(root / f"b{s}"))
    return runs, better


def test_welch_against_scipy_free_computation():
    a, b = [1.0, 1.1, 0.9, 1.05], [1.5, 1.4, 1.6]
    # Welch t and Satterthwaite degrees of freedom computed by hand
    import statistics
    from math import sqrt

    from scipy import stats
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert welch_one_sided(a, b) == pytest.approx(stats.t.cdf(t, df))
    assert welch_one_sided(a, b) < 0.01 and welch_one_sided(b, a) > 0.99


def test_records_and_check(seeds, tmp_path):
    weak, strong = seeds
    rec, path = make_record(weak, "cpu", "weak", tmp_path)
    assert path.parent == tmp_path / "cpu" and re.fullmatch(r"\d{4}-\d{2}-\d{2}_weak\.json", path.name)
    assert rec["seeds"] == [0, 1, 2] and len(rec["test_loss"]["per_seed"]) == 3 and rec["vs_best"] is None
    per_seed = [_res(r)["variants"]["final"]["test_loss"] for r in weak]
    assert rec["test_loss"]["per_seed"] == per_seed
    c = check(strong, "cpu", tmp_path)
    assert c["beats"] and c["p_value"] < 0.05
    # decided on val (test is only reported beside it): a check run in a loop never tunes on test
    strong_val = [_res(r)["val_loss"] for r in strong]
    assert c["split"] == "val" and c["candidate_mean"] == pytest.approx(sum(strong_val) / 3)
    assert c["p_value"] == pytest.approx(welch_one_sided(strong_val, rec["val_loss"]["per_seed"]))
    assert c["candidate_test_mean"] == pytest.approx(sum(_test_losses(strong)) / 3)
    rec2, _ = make_record(strong, "cpu", "strong", tmp_path)
    assert rec2["vs_best"]["record"] == "weak" and rec2["vs_best"]["beats"]
    assert not check(weak, "cpu", tmp_path)["beats"]  # now the strong one is the record
    r = subprocess.run([sys.executable, "-m", "slowrun", "record", "--check", *weak, "--records", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "on val:" in r.stdout and "does not beat record strong" in r.stdout and "test beside it" in r.stdout


def _res(run) -> dict:
    return json.loads((Path(run) / "result.json").read_text())


def _test_losses(runs):
    out = []
    for r in runs:
        res = _res(r)
        out.append(res["variants"][res["best"]]["test_loss"])
    return out


def test_record_bad_inputs(seeds, tmp_path):
    weak, strong = seeds
    with pytest.raises(RecordError, match="at least 3 seeds"):
        make_record(weak[:2], "cpu", "x", tmp_path)
    with pytest.raises(RecordError, match="differs from"):
        make_record([weak[0], weak[1], strong[2]], "cpu", "x", tmp_path)
    with pytest.raises(ResultError, match="no result.json"):
        make_record([*weak[:2], str(tmp_path / "missing")], "cpu", "x", tmp_path)
    make_record(weak, "cpu", "dup", tmp_path)
    with pytest.raises(RecordError, match="already exists"):
        make_record(weak, "cpu", "dup", tmp_path)
    assert len(list((tmp_path / "cpu").glob("*.json"))) == 1


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells = [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def test_report(seeds, tmp_path):
    weak, strong = seeds
    make_record(weak, "cpu", "weak", tmp_path / "records")
    curve = tmp_path / "curve.json"
    losses = [_res(r)["variants"]["final"]["test_loss"] for r in weak]
    curve.write_text(json.dumps({"name": "t", "budget": 40000, "tokens": [40000, 80000, 160000],
                                 "losses": {"test": [max(losses) + 0.5, max(losses) + 0.2, min(losses) - 1.0]}}))
    page = build_report([weak[0], strong[0]], tmp_path / "rep", str(curve), tmp_path / "records", "cpu")
    parser = _Refs()
    parser.feed(page.read_text())
    assert parser.images and all((tmp_path / "rep" / img).is_file() for img in parser.images)
    # every loss in the tables is the one in the JSON it came from
    for run in (weak[0], strong[0]):
        res = _res(run)
        for v in res["variants"].values():
            assert f"{v['val_loss']:.4f}" in parser.cells and f"{v['test_loss']:.4f}" in parser.cells
    rec = json.loads(next((tmp_path / "records" / "cpu").glob("*.json")).read_text())
    assert f"{rec['test_loss']['mean']:.4f}" in parser.cells
    assert any(c.endswith("x") for c in parser.cells)  # an efficiency figure
    with pytest.raises(ReportError, match="not a run or ensemble"):
        build_report([str(tmp_path / "nothing")], tmp_path / "rep2")
    # wall time as a duration, not seconds
    wall = _res(weak[0])["wall_s"]
    assert fmt_time(wall) in parser.cells and f"{wall:.4f}" not in parser.cells


def test_val_by_epoch_ends_with_the_final_evaluation(seeds):
    run = Path(seeds[0][0])
    res = json.loads((run / "result.json").read_text())
    epochs, losses, final = val_by_epoch(run, res)
    assert final == res["best"] and epochs[-1] == res["epochs"] and losses[-1] == res["variants"][res["best"]]["val_loss"]
    assert val_by_epoch(run, None)[2] is None and len(val_by_epoch(run, None)[0]) == len(epochs) - 1


def test_fmt_time():
    assert fmt_time(5970.02) == "1h39m30s" and fmt_time(83) == "1m23s" and fmt_time(0) == "0m00s"


def test_report_of_a_run_in_progress(seeds, tmp_path):
    run = tmp_path / "live"
    shutil.copytree(seeds[0][0], run)
    (run / "result.json").unlink()
    page = build_report([str(run)], tmp_path / "rep")
    text = page.read_text()
    assert "in progress" in text and (tmp_path / "rep" / "loss_by_step.png").is_file()


def test_report_refuses_bad_results_in_one_line(seeds, tmp_path):
    run = tmp_path / "bad"
    shutil.copytree(seeds[0][0], run)
    res = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**res, "best": "swa_probs"}))
    with pytest.raises(ResultError, match=r"result.json:1: field 'best' is a string \(.swa_probs.\), not one of the keys"):
        build_report([str(run)], tmp_path / "rep")
    best = res["best"]
    (run / "result.json").write_text(json.dumps({**res, "variants": {**res["variants"], best: {**res["variants"][best],
                                                                                               "val_loss": "x"}}}))
    with pytest.raises(ResultError, match=rf"result.json:1: field 'variants.{best}.val_loss' is a string \(.x.\), not a number"):
        build_report([str(run)], tmp_path / "rep")
    (run / "result.json").write_text(json.dumps(res)[:50])
    r = subprocess.run([sys.executable, "-m", "slowrun", "report", str(run), "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "corrupt" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "rep").exists()  # nothing is written for a report that cannot be made


def _track_results():
    """A CPU track results file as `slowrun bench cpu-track` writes it (the fields the report reads)."""
    chosen = [{"budget": 1, "point": {"model.depth": 8}, "params": 1000, "seeds": 2, "val_loss": 5.4, "test_loss": 5.38,
               "test_spread": 0.004},
              {"budget": 2, "point": {"model.depth": 6}, "params": 900, "seeds": 2, "val_loss": 5.05, "test_loss": 5.0,
               "test_spread": 0.003}]
    entry = {"members": 1, "variant": "swa_probs", "test_loss": 5.19, "test_bpb": 1.7, "wall_s": 1500.0,
             "efficiency": 1.5, "efficiency_extrapolated": False,
             "efficiency_second": {"curve": "gpt2", "efficiency": 12.75, "efficiency_extrapolated": False}}
    ens = {**entry, "members": 2, "variant": "probability average", "test_loss": 4.95, "efficiency": 2.1234,
           "efficiency_extrapolated": True, "per_k": [{"k": 1, "probs_test_loss": 5.19, "logits_test_loss": 5.19},
                                                      {"k": 2, "probs_test_loss": 4.95, "logits_test_loss": 4.97}],
           "efficiency_by_k": [{"efficiency": 1.5, "efficiency_extrapolated": False},
                               {"efficiency": 2.1234, "efficiency_extrapolated": True}]}
    return {"baseline_curve": {"recipe": "nanochat", "tokens": [1000, 2000], "chosen": chosen,
                               "fit": {"metric": "test", "status": "no fit: a power-law fit needs at least 4 points (3 parameters and one to check them), got 2"},
                               "losses": {"val": [5.4, 5.05], "test": [5.38, 5.0]}, "pending": {"4x": "seeds, 1 run(s) to train"}},
            "gpt2_curve": {"name": "gpt2", "tokens": [1000, 2000], "losses": {"test": [6.0, 5.5]},
                           "fit": {"metric": "test", "status": "hit its bound E = 0: no estimate", "rms_residual": 0.0607}},
            "single": entry, "ensemble": ens}


def test_report_of_the_cpu_track_from_its_results_file(tmp_path):
    """The track's page needs no run directory: the curve (with what is pending of it) and every
    entry's efficiency on both curves come from the results file; a plot of an earlier build
    that the page no longer shows is removed; a file that is no track results is one line."""
    res = tmp_path / "cpu_track.json"
    res.write_text(json.dumps(_track_results()))
    out = tmp_path / "rep"
    out.mkdir()
    (out / "loss_by_step.png").write_bytes(b"stale")  # from a build that had the entries' run directories
    (out / "notes.png").write_bytes(b"mine")  # not a plot of the report's: kept
    page = build_report([], out, track_results=str(res)).read_text()
    assert (out / "track_curves.png").stat().st_size > 1000 and not (out / "loss_by_step.png").exists()
    assert (out / "track_per_k.png").stat().st_size > 1000
    assert (out / "notes.png").read_bytes() == b"mine"
    text = re.sub(r"\|+", "|", re.sub(r"<[^>]+>", "|", page))
    assert "|single model|1|swa_probs|5.1900|1.7000|1.50x|12.75x|" in text
    assert "|ensemble|2|probability average|4.9500|1.7000|2.12x (extrapolated)|12.75x|" in text
    assert "|4x|-|pending: seeds, 1 run(s) to train|" in text
    assert "|1x|1000|depth 8|1000|2|5.4000|5.3800|0.0040|" in text
    assert "|ensemble|2|4.9500|2.12x (extrapolated)|4.9700|" in text  # by ensemble size
    assert "Power-law fit of the nanochat curve: no fit: a power-law fit needs at least 4 points (3 parameters and one to check them), got 2" in text
    assert "Power-law fit of gpt2: hit its bound E = 0: no estimate (rms residual 0.0607)" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"single": {}}))
    with pytest.raises(ReportError, match="not a results file of `slowrun bench cpu-track`"):
        build_report([], tmp_path / "rep2", track_results=str(bad))
    r = subprocess.run([sys.executable, "-m", "slowrun", "report", "--out", str(tmp_path / "rep3"), "--track-results",
                        str(res)], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "rep3" / "track_curves.png").is_file(), r.stderr


def _without(text, key):
    return json.dumps({k: v for k, v in json.loads(text).items() if k != key}, indent=2)


def _string_seed_loss(text):
    rec = json.loads(text)
    rec["val_loss"]["per_seed"][0] = "5.1"
    return json.dumps(rec, indent=2)


@pytest.mark.parametrize("damage, says", [
    (lambda text: text[: len(text) // 2], r": corrupt, not valid JSON at line \d+, column \d+ .*truncated\?"),
    (lambda text: _without(text, "test_loss"), r": field 'test_loss' is missing"),
    (_string_seed_loss, r":\d+: field 'val_loss.per_seed\[0\]' is a string \(.5.1.\), not a number"),
])
def test_a_damaged_record_file_is_one_line_for_every_command(seeds, tmp_path, capsys, damage, says):
    """record --check, record and report --records read the track's records through one reader:
    a truncated or incomplete file is named with its line and field, exit 2, no traceback."""
    from slowrun.cli import main

    weak, strong = seeds
    records = tmp_path / "records"
    _, path = make_record(weak, "cpu", "weak", records)
    path.write_text(damage(path.read_text()))
    for args in (["record", "--check", *strong], ["record", *strong, "--name", "strong"],
                 ["report", *strong, "--out", str(tmp_path / "rep")]):
        assert main([*args, "--records", str(records)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(re.escape(str(path)) + says, err), err
    assert [p.name for p in (records / "cpu").iterdir()] == [path.name] and not (tmp_path / "rep").exists()
