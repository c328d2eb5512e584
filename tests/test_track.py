"""The CPU track runner end to end, on a miniature track definition."""

import json
from pathlib import Path

import pytest

from slowrun.track import Entry, TrackDef, run_track


def test_track_pipeline_end_to_end(tmp_path):
    t = TrackDef(name="mini", tokenizer="bpe:400", budget=20_000, val_tokens=4_000, test_tokens=4_000, budgets=[1, 2, 3],
                 baseline_grid={"model.n_embd": [32, 64], "optim.lr": [0.003]}, baseline_grid_by_budget={},
                 baseline_fixed={"model.seq_len": 32, "model.n_layer": 1, "model.n_head": 2, "train.batch_tokens": 1024,
                                 "eval.max_tokens": 512},
                 single=Entry("smoke", {"train.max_steps": 6, "eval.max_tokens": 512}),
                 ensemble=Entry("smoke", {"train.max_steps": 6, "eval.max_tokens": 512}, members=2),
                 distill=Entry("smoke", {"train.max_steps": 6, "eval.max_tokens": 512}, members=2, distill=True))
    out = tmp_path / "cpu_track.json"
    res = run_track(t, tmp_path / "work", out, tmp_path / "report", parts=("curve", "single", "ensemble", "distill"), jobs=2,
                    threads=1)
    saved = json.loads(out.read_text())
    assert {"baseline_curve", "single", "ensemble", "machine", "track"} <= set(saved)
    assert saved["baseline_curve"]["tokens"] == [20_000, 40_000, 60_000]
    assert len(saved["baseline_curve"]["points"]) == 6
    for kind in ("single", "ensemble"):
        s = saved[kind]
        for key in ("test_loss", "test_bpb", "val_loss", "efficiency", "members", "wall_s", "tokens_per_s", "peak_rss_mb",
                    "resolved_recipe"):
            assert key in s, (kind, key)
        assert isinstance(s["efficiency"], float) and s["efficiency"] > 0
    assert saved["ensemble"]["members"] == 2 and len(saved["ensemble"]["per_k"]) == 2
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
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "efficiency.png").is_file()
    # cached: a second invocation trains nothing new and gives the same numbers
    again = run_track(t, tmp_path / "work", out, tmp_path / "report", parts=("single",), jobs=2, threads=1)
    assert again["single"]["test_loss"] == res["single"]["test_loss"]
