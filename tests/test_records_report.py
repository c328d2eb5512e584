import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from slowrun.records import RecordError, check, make_record, welch_one_sided
from slowrun.report import ReportError, build_report
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
    per_seed = [json.loads(open(f"{r}/result.json").read())["variants"]["final"]["test_loss"] for r in weak]
    assert rec["test_loss"]["per_seed"] == per_seed
    c = check(strong, "cpu", tmp_path)
    assert c["beats"] and c["p_value"] < 0.05
    rec2, _ = make_record(strong, "cpu", "strong", tmp_path)
    assert rec2["vs_best"]["record"] == "weak" and rec2["vs_best"]["beats"]
    assert not check(weak, "cpu", tmp_path)["beats"]  # now the strong one is the record
    r = subprocess.run([sys.executable, "-m", "slowrun", "record", "--check", *weak, "--records", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "does not beat record strong" in r.stdout


def test_record_bad_inputs(seeds, tmp_path):
    weak, strong = seeds
    with pytest.raises(RecordError, match="at least 3 seeds"):
        make_record(weak[:2], "cpu", "x", tmp_path)
    with pytest.raises(RecordError, match="differs from"):
        make_record([weak[0], weak[1], strong[2]], "cpu", "x", tmp_path)
    with pytest.raises(RecordError, match="no result.json"):
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
    losses = [json.loads(open(f"{r}/result.json").read())["variants"]["final"]["test_loss"] for r in weak]
    curve.write_text(json.dumps({"name": "t", "budget": 40000, "tokens": [40000, 80000, 160000],
                                 "losses": {"test": [max(losses) + 0.5, max(losses) + 0.2, min(losses) - 1.0]}}))
    page = build_report([weak[0], strong[0]], tmp_path / "rep", str(curve), tmp_path / "records", "cpu")
    parser = _Refs()
    parser.feed(page.read_text())
    assert parser.images and all((tmp_path / "rep" / img).is_file() for img in parser.images)
    # every loss in the tables is the one in the JSON it came from
    for run in (weak[0], strong[0]):
        res = json.loads(open(f"{run}/result.json").read())
        for v in res["variants"].values():
            assert f"{v['val_loss']:.4f}" in parser.cells and f"{v['test_loss']:.4f}" in parser.cells
    rec = json.loads(next((tmp_path / "records" / "cpu").glob("*.json")).read_text())
    assert f"{rec['test_loss']['mean']:.4f}" in parser.cells
    assert any(c.endswith("x") for c in parser.cells)  # an efficiency figure
    with pytest.raises(ReportError, match="no result.json"):
        build_report([str(tmp_path / "nothing")], tmp_path / "rep2")
