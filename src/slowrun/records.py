"""Records as data: `records/<track>/<date>_<name>.json`, with seeds and a significance test.

A record holds the recipe (resolved config), git commit, hardware, wall time, tokens seen,
the seeds, per-seed val and test loss, their mean +- std, the data efficiency of the mean
test loss on a baseline curve, and, against the current best of the track, a one-sided
Welch t-test p-value (is the candidate's mean test loss lower?). A record needs at least
3 seeds. `--check` says whether a candidate beats the record at p < 0.05 *on val*, with
test beside it: a check can be run after every change, and a split consulted that often
is a tuning signal, so test decides only when a record is made.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from . import SlowrunError
from .efficiency import Curve, EfficiencyError, check_same_data, place
from .formats import RECORD, read_checked
from .results import chosen, read_result
from .storage import atomic_write_json

MIN_SEEDS = 3
ALPHA = 0.05


class RecordError(SlowrunError):
    pass


def _losses(result: dict) -> tuple[float, float]:
    _, losses = chosen(result)
    return losses["val_loss"], losses.get("test_loss", math.nan)


def _comparable_config(cfg: dict) -> dict:
    """A run's config without what legitimately differs between seeds of one recipe."""
    cfg = json.loads(json.dumps(cfg))
    cfg.get("train", {}).pop("seed", None)
    cfg.get("distill", {}).pop("teacher", None)
    return cfg


def welch_one_sided(candidate: list[float], best: list[float]) -> float:
    """p-value of H1: mean(candidate) < mean(best), Welch's unequal-variance t-test."""
    from scipy import stats

    return float(stats.ttest_ind(candidate, best, equal_var=False, alternative="less").pvalue)


@dataclass
class Candidate:
    runs: list[str]
    results: list[dict]

    @property
    def seeds(self) -> list[int]:
        return [r.get("seed", r.get("seeds", [None])[0] if r.get("seeds") else None) for r in self.results]

    @property
    def test_losses(self) -> list[float]:
        return [_losses(r)[1] for r in self.results]

    @property
    def val_losses(self) -> list[float]:
        return [_losses(r)[0] for r in self.results]


def load_candidate(runs: list[str]) -> Candidate:
    if len(runs) < MIN_SEEDS:
        raise RecordError(f"a record needs at least {MIN_SEEDS} seeds (runs), got {len(runs)}")
    results = [read_result(r) for r in runs]
    first = _comparable_config(results[0]["config"])
    for run, res in zip(runs[1:], results[1:]):
        if _comparable_config(res["config"]) != first:
            raise RecordError(f"{run}: its config differs from {runs[0]} beyond the seed; a record is one recipe over seeds")
    c = Candidate(runs, results)
    if len(set(map(str, c.seeds))) != len(runs):
        raise RecordError(f"the runs must have distinct seeds, got {c.seeds}")
    if any(math.isnan(x) for x in c.test_losses):
        raise RecordError("every run needs a test loss (eval.test = true)")
    return c


def track_records(records_dir: str | Path, track: str) -> list[dict]:
    d = Path(records_dir) / track
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        rec = read_checked(p, RECORD, RecordError)
        rec["_path"] = str(p)
        out.append(rec)
    return out


def current_best(records_dir: str | Path, track: str) -> dict | None:
    recs = track_records(records_dir, track)
    return min(recs, key=lambda r: r["test_loss"]["mean"]) if recs else None


def compare(c: Candidate, best: dict | None, split: str = "test") -> dict | None:
    """One-sided Welch test of the candidate's `split` losses against the record's; both
    splits' means are reported."""
    if best is None:
        return None
    mine = c.val_losses if split == "val" else c.test_losses
    p = welch_one_sided(mine, best[f"{split}_loss"]["per_seed"])
    return {"record": best["name"], "record_path": best.get("_path"), "split": split, "p_value": p, "beats": p < ALPHA,
            "record_mean": best[f"{split}_loss"]["mean"], "candidate_mean": statistics.fmean(mine),
            "record_test_mean": best["test_loss"]["mean"], "candidate_test_mean": statistics.fmean(c.test_losses)}


def make_record(runs: list[str], track: str, name: str, records_dir: str | Path = "records", curve: str | None = None,
                notes: str = "", force: bool = False) -> tuple[dict, Path]:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise RecordError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    c = load_candidate(runs)
    r0 = c.results[0]
    tl, vl = c.test_losses, c.val_losses
    record = {
        "track": track, "name": name, "date": time.strftime("%Y-%m-%d"), "notes": notes,
        "recipe": r0["config"], "git_commit": r0.get("environment", {}).get("git_commit"),
        "hardware": r0.get("environment", {}).get("device"), "torch": r0.get("environment", {}).get("torch"),
        "wall_s": {"per_seed": [r.get("wall_s") for r in c.results], "mean": statistics.fmean(r.get("wall_s", 0) for r in c.results)},
        "tokens_seen": r0.get("tokens_seen"), "unique_tokens": r0.get("unique_tokens") or r0.get("dataset", {}).get("train_tokens"),
        "members": len(r0.get("members", [])) or 1,
        "seeds": c.seeds, "runs": [str(r) for r in runs],
        "val_loss": {"per_seed": vl, "mean": statistics.fmean(vl), "std": statistics.stdev(vl)},
        "test_loss": {"per_seed": tl, "mean": statistics.fmean(tl), "std": statistics.stdev(tl)},
        "dataset": {k: r0.get("dataset", {}).get(k) for k in ("tokenizer", "val", "test")},
    }
    if curve:
        cv = Curve.load(curve)
        check_same_data(cv, r0.get("dataset", {}))
        try:
            pl = place(cv, record["test_loss"]["mean"], "test" if "test" in cv.losses else "val")
            record["efficiency"] = {"value": pl.efficiency, "tokens": pl.tokens, "curve": curve, "metric": pl.metric}
        except EfficiencyError as e:
            record["efficiency"] = {"value": None, "error": str(e), "curve": curve}
    best = current_best(records_dir, track)
    record["vs_best"] = compare(c, best)
    out = Path(records_dir) / track / f"{record['date']}_{name}.json"
    if out.exists() and not force:
        raise RecordError(f"{out} already exists (use another --name, or --force)")
    atomic_write_json(out, record)
    return record, out


def check(runs: list[str], track: str, records_dir: str | Path = "records") -> dict:
    """Would the runs beat the track's record? Decided on val (see the module docstring)."""
    c = load_candidate(runs)
    best = current_best(records_dir, track)
    if best is None:
        return {"record": None, "beats": True, "split": "val", "candidate_mean": statistics.fmean(c.val_losses),
                "candidate_test_mean": statistics.fmean(c.test_losses), "note": f"track {track} has no record yet"}
    return compare(c, best, "val")
