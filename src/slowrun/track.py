"""The CPU track: the benchmark at a scale that runs on two cores, offline.

Rules (also in the README):
- data: the builtin corpus; tokenizer bpe:8192 trained on the 1x training text and shared
  by every budget; val 131,072 and test 131,072 tokens; budget 262,144 training tokens;
- baseline curve, measured the way the reference benchmark measures its own: the
  `nanochat_ref` recipe (nanochat at commit 1076f97, as the reference ran it, at CPU scale),
  one epoch, at 1x, 2x, 4x, 8x and 16x the budget
  (nested datasets sharing val/test); at every budget the best on val of at least four model
  sizes, the chosen size never the smallest or largest tried (the next size is added until
  it is not); learning rate and batch tuned once at 1x (3 x 2 values around nanochat's
  defaults) and then fixed; at 16x the chosen size also at 0.5x and 2x that learning rate;
  each chosen point run with 2 seeds, the curve being their mean;
- metric: test loss (val only for selection and tuning), bits per byte beside it, and
  data efficiency on the measured `nanochat_ref` curve; the GPT-2-style curve
  (`benchmarks/results/curves/cpu_gpt2.json`) is kept as a second comparator;
- compute: unlimited in principle; the reference entries are a single model in at most
  30 minutes and an ensemble in at most 2 hours on 2 cores (a single entry or an ensemble's
  member read from a ledger, trained on fewer threads beside other jobs, is timed by a run of
  its config on 2 threads, another seed's where its own did not run so).

`run_track` runs (resumably: every finished curve run is in the committed ledger
`benchmarks/results/ledger.jsonl`, entries are cached by config and dataset hash) the
baseline curve, the single-model and ensemble entries, measures throughput and memory,
writes `benchmarks/results/cpu_track.json` and renders the report.

`slowrun bench --help` reads TRACK_PARTS from this module, so what imports torch (the sweep,
jobs, ensembles, the report, the run log, throughput) is imported inside the functions that
run it (`# imports torch`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import SlowrunError
from .config import build_config, config_to_dict
from .dataset import Dataset
from .efficiency import Curve, curve_fit, describe_efficiency, efficiency_on
from .formats import CURVE, read_checked
from .ledger import Ledger, config_key, dataset_identity, entry_from_result
from .prepare import PrepareConfig, prepare
from .results import chosen, is_ensemble, read_result
from .rundir import RunDir
from .storage import atomic_write_json, read_json


class TrackError(SlowrunError):
    pass


@dataclass
class Entry:
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)
    members: int = 1
    distill: bool | str = False  # True (or "chain"): chain distillation; "ensemble": the last member learns from the others
    alpha: float = 0.5
    temperature: float = 1.2
    limit_s: int = 1800  # the track's wall-time allowance for this kind of entry


# the entries are the slowrun recipe as it is, with periodic evaluations on 32k val tokens (the final one
# reads the whole split), as the ablations' runs: the single entry is then the config of their full
# recipe's seed 0, read from the ablation ledger rather than trained again (ENTRY_LEDGERS)
ENTRY_OVERRIDES = {"eval.max_tokens": 32768}
# the committed ledgers (beside the results file) a single-model entry's run is looked up in before it
# is trained: the track's own, then the ablations'
ENTRY_LEDGERS = ("ledger.jsonl", "ablation_ledger.jsonl")
# (optim.lr_scale, train.batch_tokens) that won each curve recipe's 1x tuning grid (dev/LOG.md), held
# fixed at 2x-16x; a recipe not in it is measured at 1x only, until its winner is written here
# nanochat_ref (2026-12-07): lr 2, batch 2,048 at depth 6, inside on every axis (depth 7, lr 1 and 4, batch
# 1,024 and 4,096 all lose)
CURVE_TUNED: dict[str, tuple[float, int]] = {"nanochat": (0.5, 1024), "nanochat_ref": (2.0, 2048)}
# the sizes tried at 2x-16x per curve recipe: four each, around where the size is expected to win (the
# expansion adds sizes while the best is at an edge). nanochat: at 1x the largest of depth 2-5 won, so the
# sets start at 4 and move up with the data; 16x (set 2026-11-28, before any 16x run): depth 9 won at 4x
# and 8x's best was at least 7, so 7-10, which on a GPU is one round of four parallel runs instead of a
# grid and then expansion rounds one size at a time. nanochat_ref (set 2026-12-07, before any 2x run):
# depth 6 won at 1x (width 384; its width is rounded up to a multiple of 128, so depths 7-8 are 512 wide
# and 9-10 640), so the sets started at 5 and moved up one depth per doubling. Changed 2026-12-07, after
# 4x's depths 6 and 7 (depth 6 won, 4.4524 against 4.4634 val): the size does not grow with the data
# here, so 4x and 8x take 5-8 (four sizes around 6; 4x's 9 and 8x's 9-10, ~11 CPU hours, dropped) and 16x 6-9
CURVE_DEPTHS = {
    "nanochat": {2: [4, 5, 6, 7], 4: [4, 5, 6, 7], 8: [5, 6, 7, 8], 16: [7, 8, 9, 10]},
    "nanochat_ref": {2: [5, 6, 7, 8], 4: [5, 6, 7, 8], 8: [5, 6, 7, 8], 16: [6, 7, 8, 9]},
}


@dataclass
class TrackDef:
    name: str = "cpu"
    source: str = "builtin"
    tokenizer: str = "bpe:8192"
    budget: int = 262_144
    val_tokens: int = 131_072
    test_tokens: int = 131_072
    budgets: list[float] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    curve_recipe: str = "nanochat_ref"
    # 1x: four sizes x lr_scale x batch around nanochat's defaults (the lr and batch are tuned here once)
    curve_grid: dict[str, list] = field(default_factory=lambda: {
        "model.depth": [2, 3, 4, 5],  # 2x128, 3x192, 4x256, 5x320 (layers x width)
        "optim.lr_scale": [0.5, 1.0, 2.0],
        "train.batch_tokens": [1024, 2048],
    })
    # a checkpoint every 128 steps: a 4x-16x run takes hours on this CPU, and a run stopped with its
    # session resumes from the last one (the ledger key leaves checkpointing out, so finished points stand)
    curve_fixed: dict[str, Any] = field(default_factory=lambda: {"train.checkpoint_every": 128})
    # 2x-16x: lr and batch held at what won at 1x (CURVE_TUNED), the sizes of CURVE_DEPTHS; None: from those
    curve_grid_by_budget: dict[float, dict[str, list]] | None = None
    curve_expand: str = "model.depth"
    # 1x: the winner's lr and batch each halved and doubled once more, in case the best sits at an edge
    # of the grid (points already run are not run again); 16x: the chosen size at 0.5x and 2x the fixed
    # lr (the check that one lr serves every budget)
    curve_refine: dict[float, dict[str, list[float]]] = field(default_factory=lambda: {
        1: {"optim.lr_scale": [0.5, 2.0], "train.batch_tokens": [0.5, 2.0]}, 16: {"optim.lr_scale": [0.5, 2.0]}})
    curve_seeds: int = 2
    # the GPT-2-style curve of 2026-11-26 (committed data; its runs are not redone)
    gpt2_curve: str = "benchmarks/results/curves/cpu_gpt2.json"
    single: Entry = field(default_factory=lambda: Entry("slowrun", dict(ENTRY_OVERRIDES), limit_s=1800))
    entry_threads: int = 2  # the threads (the track's two cores) an entry's wall time is checked at

    def __post_init__(self) -> None:
        if self.curve_grid_by_budget is None:
            tuned = CURVE_TUNED.get(self.curve_recipe)
            self.curve_grid_by_budget = {} if tuned is None else {
                b: {"model.depth": d, "optim.lr_scale": [tuned[0]], "train.batch_tokens": [tuned[1]]}
                for b, d in CURVE_DEPTHS[self.curve_recipe].items()}
    ensemble: Entry = field(default_factory=lambda: Entry("slowrun", dict(ENTRY_OVERRIDES), members=4, limit_s=7200))
    # Three members as the plain ensemble's first three (the same configs and seeds: one run each), then
    # a fourth that learns from all three (Kim et al.'s distillation of an ensemble), the four averaged.
    # The chain pair it replaces (2026-12-07, depth 6: member 1 learned from member 0) scored 4.7862,
    # below the plain pair's 4.7744: one teacher's knowledge added less than an independent member, and a
    # depth-4 student of four members kept 73% of their gain (dev/LOG.md). Three depth-6 teachers take
    # 3 x 23.7 min on two cores, the student ~40 (a distillation step cost 1.25x a plain one with one teacher).
    distill: Entry = field(default_factory=lambda: Entry("slowrun", dict(ENTRY_OVERRIDES), members=4,
                                                         distill="ensemble", limit_s=7200))


TRACK = TrackDef()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def track_data(t: TrackDef, work: Path) -> Dataset:
    cfg = PrepareConfig(source=t.source, tokenizer=t.tokenizer, train_tokens=t.budget, val_tokens=t.val_tokens,
                        test_tokens=t.test_tokens, out=str(work / "data" / "1x"), progress=False)
    return Dataset.open(prepare(cfg))


def curve_sweep(t: TrackDef, work: Path, data: Dataset, jobs: int, threads: int, ledger: str = "",
                budgets: list[float] | None = None):
    """The sweep that measures the track's baseline curve (all its budgets, or `budgets`)."""
    from .sweep import SweepConfig  # imports torch

    budgets = budgets or t.budgets
    unknown = [b for b in budgets if b not in t.budgets]
    if unknown:
        raise TrackError(f"--budgets {' '.join(f'{b:g}' for b in unknown)}: not budgets of the track ({t.budgets})")
    untuned = [b for b in budgets if b != 1 and b not in t.curve_grid_by_budget and t.curve_recipe not in CURVE_TUNED]
    if untuned:
        raise TrackError(f"--budgets {' '.join(f'{b:g}' for b in untuned)}: the {t.curve_recipe} curve's lr and batch "
                         f"are tuned at 1x first (--budgets 1), then held: write the 1x winner into CURVE_TUNED "
                         f"(src/slowrun/track.py)")
    return SweepConfig(t.curve_recipe, str(data.path), str(work / f"{t.curve_recipe}-curve"), budgets, t.curve_grid,
                       t.curve_fixed, {b: g for b, g in t.curve_grid_by_budget.items() if b in budgets}, jobs, threads,
                       name=f"{t.name}-track {t.curve_recipe}", ledger=ledger, expand=t.curve_expand,
                       refine={b: r for b, r in t.curve_refine.items() if b in budgets}, seeds=t.curve_seeds)


def baseline_curve(t: TrackDef, work: Path, data: Dataset, jobs: int, threads: int, ledger: str = "",
                   budgets: list[float] | None = None, train: bool = True) -> dict:
    """The track's baseline curve (every run recorded in `ledger`); with `budgets`, only
    those budgets of it (the curve measured a few budgets at a time, over several sessions);
    with `train=False`, the budgets finished so far, training nothing (the rest `pending`)."""
    from .jobs import JobsFailed  # imports torch
    from .sweep import SweepError, describe, sweep  # imports torch

    try:
        curve = sweep(curve_sweep(t, work, data, jobs, threads, ledger, budgets), train=train)
    except SweepError as e:
        raise TrackError(f"baseline curve: {e}") from None
    except JobsFailed as e:  # the curve of the other budgets, then the error
        if e.partial is not None:
            print(describe(e.partial), flush=True)
        raise
    print(describe(curve), flush=True)
    return curve


def ledger_of(out_json: str | Path) -> str:
    """The results ledger beside the track's results file (benchmarks/results/ledger.jsonl)."""
    return str(Path(out_json).parent / "ledger.jsonl")


def plan_curve(t: TrackDef, work: str | Path, out_json: str | Path, jobs: int, threads: int,
               budgets: list[float] | None = None) -> str:
    """What measuring the baseline curve trains next (nothing is trained), as text."""
    from .sweep import describe_plan, plan  # imports torch

    work = Path(work)
    return describe_plan(*plan(curve_sweep(t, work, track_data(t, work), jobs, threads, ledger_of(out_json), budgets)))


def entry_key(e: Entry, data: Dataset) -> str:
    """An entry's identity: the entry, its resolved config as the ledger keys it (values at their
    defaults left out, so a config field added later does not orphan a finished entry) and the
    dataset's files. It names the entry's run directory, and a stored entry of the same key is not
    trained again."""
    resolved = config_to_dict(build_config(e.recipe, {**e.overrides, "data.path": str(data.path)}))
    return _hash({"entry": asdict(e), "config": config_key(resolved), "dataset": data.manifest["files"]})


def _entry_dir(work: Path, kind: str, e: Entry, data: Dataset) -> Path:
    """Where an entry trains: named by its kind, its recipe and its key."""
    return work / kind / f"{Path(e.recipe).stem}-{entry_key(e, data)}"


def _run_in_ledgers(recipe: str, overrides: dict, data: Dataset, ledgers: list[Path]) -> tuple[dict, str] | None:
    """(the ledger line, where it is) of the run of `recipe` with `overrides` on `data`, from the
    first ledger that has it, or None."""
    from .train import resolve  # imports torch

    planned = build_config(recipe, {**overrides, "data.path": str(data.path)})
    key = config_key(config_to_dict(resolve(planned, data)))
    for path in ledgers:
        hit = Ledger.open(path).find(key, dataset_identity(data.manifest)) if path.is_file() else None
        if hit is not None:
            return hit, f"{path}:{hit['_line']}"
    return None


def _copy_run(src: Path, dest: Path) -> None:
    """A finished run copied to `dest` whole or not at all (its checkpoints left out: it trains no more)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted copy
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints"))
    tmp.rename(dest)


def _adopt_members(e: Entry, run_dir: Path, data: Dataset, ledgers: list[Path]) -> None:
    """Each member an ensemble trains without a teacher (every one of a plain ensemble, the
    teachers of an "ensemble" distillation, the first of a chain) whose run a ledger holds with
    its run directory finished on this machine (an ablation's seeds of the same config) is copied
    in rather than trained again."""
    from .ensemble import distill_mode, member_overrides  # imports torch

    mode = distill_mode(e.distill)
    untaught = {"": e.members, "ensemble": e.members - 1, "chain": 1}[mode]
    seed = build_config(e.recipe, {**e.overrides, "data.path": str(data.path)}).train.seed
    for k in range(untaught):
        dest = RunDir(run_dir).member(k)
        found = None if dest.exists() else _run_in_ledgers(e.recipe, member_overrides(e.overrides, seed, k), data, ledgers)
        if found is not None and found[0].get("run_dir") and RunDir(found[0]["run_dir"]).finished():
            print(f"member {k}: its run is in the ledger ({found[1]}): copied from {found[0]['run_dir']}", flush=True)
            _copy_run(Path(found[0]["run_dir"]), dest)


def _members_timed(result: dict, threads: int, ledgers: list[Path]) -> list[dict | None]:
    """Per member of an ensemble's result: None where it trained on `threads` threads, else the
    run of its config on `threads` threads that times it (_timed_in_ledgers), else None."""
    timed = []
    for member in result["members"]:
        r = read_result(member)
        line = entry_from_result(r, {})
        hit = None if line.get("threads") == threads else _timed_in_ledgers(line, threads, ledgers)
        timed.append(None if hit is None else {"ledger": hit[1], "seed": hit[0].get("seed"), "threads": threads,
                                               "wall_s": hit[0]["wall_s"], "own_wall_s": r["wall_s"]})
    return timed


def _seedless_key(config: dict) -> str:
    return config_key({**config, "train": {**config.get("train", {}), "seed": 0}})


def _timed_in_ledgers(line: dict, threads: int, ledgers: list[Path]) -> tuple[dict, str] | None:
    """(the ledger line, where it is) of a run on `threads` threads of the config of `line` (a
    ledger line), its own seed first, then any other; or None. A single entry read from an
    ablation ledger may have trained on one thread beside another job: its wall time then says
    nothing of the allowance, which such a run of the same config (alone on the track's cores)
    does."""
    want, found = _seedless_key(line["config"]), []
    for path in ledgers:
        if path.is_file():
            found += [(o, f"{path}:{o['_line']}") for o in Ledger.open(path).entries
                      if o.get("threads") == threads and o["dataset"] == line["dataset"]
                      and _seedless_key(o["config"]) == want]
    found.sort(key=lambda f: f[0].get("seed") != line.get("seed"))  # its own run first
    return found[0] if found else None


def run_entry(kind: str, e: Entry, work: Path, data: Dataset, jobs: int, threads: int,
              shared: Path | None = None, ledgers: list[Path] | tuple[Path, ...] = (),
              entry_threads: int = 2) -> tuple[Path, dict]:
    """Train (or reuse) an entry. A single-model entry is read from the first of `ledgers` that
    holds its config's run (on any machine), else it is the ensemble's first member (`shared`)
    when that has the same recipe and overrides (same config, same seed, one run), else trained
    and appended to the first ledger. A chain-distilled ensemble's first member has no teacher,
    so it is copied from the plain ensemble's first member when that one is finished."""
    from .ensemble import distill_mode, train_ensemble  # imports torch
    from .jobs import JobsFailed, TrainJob, run_jobs  # imports torch

    run_dir = _entry_dir(work, kind, e, data)
    if e.members == 1:
        found = _run_in_ledgers(e.recipe, e.overrides, data, list(ledgers))
        if found is not None:
            line, where = found
            print(f"{kind}: its run is in the ledger ({where}): not trained again", flush=True)
            out = {**line, "ledger": where}
            timed = _timed_in_ledgers(line, entry_threads, list(ledgers))
            if timed is not None and timed[1] != where:
                out["timed_by"] = {"ledger": timed[1], "seed": timed[0].get("seed"), "threads": entry_threads,
                                   "wall_s": timed[0]["wall_s"]}
            return Path(line.get("run_dir") or run_dir), out
        if shared is not None and RunDir(shared).finished():
            return shared, read_result(shared)
        job = TrainJob(run_dir, e.recipe, data.path, e.overrides)
        failures = run_jobs([job], 1, -1, desc=kind)
        if failures:
            raise JobsFailed(failures, f"the {kind} entry")
        if ledgers:
            Ledger.open(ledgers[0]).append(entry_from_result(job.result(), {"entry": kind, "recipe": e.recipe}))
        return run_dir, job.result()
    chain = distill_mode(e.distill) == "chain"
    first = RunDir(run_dir).member(0)
    if not RunDir(run_dir).finished():
        if chain and shared is not None and RunDir(shared).finished() and not first.exists():
            _copy_run(shared, first)
        _adopt_members(e, run_dir, data, list(ledgers))
    result = read_result(run_dir) if RunDir(run_dir).finished() else \
        train_ensemble(e.recipe, str(data.path), e.members, run_dir, e.overrides, e.distill, e.alpha, e.temperature,
                       1 if chain else jobs, threads if not chain or jobs == 1 else -1,
                       student_threads=-1 if jobs > 1 else threads)  # a member trained alone takes every core
    if result.get("members_elapsed_s") is None:  # its members' walls are summed: each on the track's threads
        result = {**result, "members_timed_by": _members_timed(result, entry_threads, list(ledgers))}
    return run_dir, result


def summarize_entry(kind: str, e: Entry, run_dir: Path, result: dict) -> dict:
    variant, best = chosen(result)
    ensemble = is_ensemble(result)
    members = len(result["members"]) if ensemble else 1
    variant = "probability average" if ensemble else variant
    member_walls = result["wall_s"]
    # the allowance is clock time: an ensemble's members trained side by side take less than the sum of
    # their walls; where that elapsed time is unknown (members trained by earlier calls), the sum counts
    elapsed = result.get("members_elapsed_s") if ensemble else None
    timed = result.get("timed_by")  # a single entry's run on fewer threads: timed by another run of its config
    if elapsed is not None:
        spent, basis = elapsed, "elapsed"
    elif ensemble:
        by = result.get("members_timed_by") or []
        # the members' training, as `elapsed` counts it: the ensemble's own evaluation left out
        spent = member_walls - result.get("eval_wall_s", 0) - sum(t["own_wall_s"] - t["wall_s"] for t in by if t)
        basis = "sum of member walls" + "".join(
            f"; member {k}'s on {t['threads']} threads: seed {t['seed']}'s run ({t['ledger']}), {t['wall_s'] / 60:.1f} min"
            for k, t in enumerate(by) if t)
    elif timed:
        spent = timed["wall_s"]
        basis = (f"wall of seed {timed['seed']}'s run on {timed['threads']} threads ({timed['ledger']}): "
                 f"{spent / 60:.1f} min")
    else:
        spent, basis = member_walls, "wall"
    out = {"run_dir": str(run_dir), "recipe": e.recipe, "overrides": e.overrides, "members": members,
           "distill": e.distill, "variant": variant, "test_loss": best["test_loss"], "test_bpb": best["test_bpb"],
           "val_loss": best["val_loss"], "val_bpb": best["val_bpb"], "wall_s": member_walls,
           "members_elapsed_s": elapsed, "within_limit": spent <= e.limit_s, "limit_s": e.limit_s,
           "limit_basis": basis, "limit_spent_s": round(spent, 2),
           "tokens_per_s": result.get("tokens_per_s"), "peak_rss_mb": result.get("peak_rss_mb"),
           "tokens_seen": result.get("tokens_seen"), "resolved_recipe": result["config"]}
    if "ledger" in result:  # read from a ledger line, not a run directory here
        out["ledger"] = result["ledger"]
    if ensemble:
        out["per_k"] = result["per_k"]
        out["methods"] = result["methods"]
    return out


def place_entry(s: dict, curve: Curve, second: Curve | None = None) -> dict:
    """Data efficiency of an entry (and of each averaging method and each K of an ensemble) on
    the track's curve, and on a second comparator curve under `second` (`efficiency_gpt2`...).
    Only stored test losses are read: an entry is placed again on a new curve without retraining."""
    for key in [k for k in s if k.startswith("efficiency")]:
        del s[key]
    s.update(efficiency_on(curve, s["test_loss"]))
    if "methods" in s:
        s["efficiency_by_method"] = {name: efficiency_on(curve, m["test_loss"]) for name, m in s["methods"].items()
                                     if "test_loss" in m}
        s["efficiency_by_k"] = [efficiency_on(curve, row["probs_test_loss"]) for row in s["per_k"]]
    if second is not None:
        s["efficiency_second"] = {"curve": second.name, **efficiency_on(second, s["test_loss"])}
        if "methods" in s:
            s["efficiency_second"]["by_method"] = {name: efficiency_on(second, m["test_loss"])
                                                   for name, m in s["methods"].items() if "test_loss" in m}
            s["efficiency_second"]["by_k"] = [efficiency_on(second, row["probs_test_loss"]) for row in s["per_k"]]
    return s


def committed_curve(curve: dict) -> dict:
    """A sweep's curve.json without machine-local paths: the form committed under results/curves/."""
    out = {k: v for k, v in curve.items() if k not in ("datasets", "wall_s")}
    out["points"] = [{k: v for k, v in p.items() if k not in ("run_dir", "overrides", "config")} for p in curve["points"]]
    out["chosen"] = [{k: v for k, v in c.items() if k != "run_dir"} for c in curve["chosen"]]
    return out


def _rss_of(cmd: list[str]) -> float:
    """Peak RSS (MB) of a command run in a child process."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def memory(t: TrackDef, work: Path, data: Dataset) -> dict:
    """Peak RSS of prepare and of a short training run at 1x and at the largest budget."""
    big = max(t.budgets)
    out: dict[str, Any] = {"budgets": [1, big]}
    tmp = work / "memory"
    for b in (1, big):
        ddir = tmp / f"data-{b:g}x"
        tok = str(data.path / "tokenizer.json") if b != 1 else t.tokenizer
        cmd = [sys.executable, "-m", "slowrun", "prepare", "--source", t.source, "--tokenizer", tok,
               "--train-tokens", str(int(t.budget * b)), "--val-tokens", str(t.val_tokens), "--test-tokens",
               str(t.test_tokens), "--out", str(ddir), "--no-progress", "--force"]
        out[f"prepare_{b:g}x_mb"] = round(_rss_of(cmd), 1)
        run = tmp / f"train-{b:g}x-{int(time.time())}"
        cmd = [sys.executable, "-m", "slowrun", "train", "--recipe", "baseline", "--data", str(ddir), "--run-dir", str(run),
               "--quiet", "--train.max_steps=30", "--eval.test=false", "--eval.max_tokens=8192", "--train.save_final=false"]
        out[f"train_{b:g}x_mb"] = round(_rss_of(cmd), 1)
        out[f"train_tokens_{b:g}x"] = int(t.budget * b)
    return out


# what `run_track` (and `slowrun bench cpu-track`) runs unless told which parts
TRACK_PARTS = ("baseline", "single", "ensemble", "distill", "throughput", "memory")


def run_track(t: TrackDef = TRACK, work: str | Path = "benchmarks/work/cpu-track",
              out_json: str | Path = "benchmarks/results/cpu_track.json", report_dir: str | Path = "benchmarks/results/cpu_track",
              parts: tuple[str, ...] = TRACK_PARTS, jobs: int = 2,
              threads: int = 1, budgets: list[float] | None = None, train_curve: bool = True) -> dict:
    """Run the parts of the track. With `budgets` (a subset of the track's), only the baseline
    curve at those budgets is measured (into the ledger) and nothing else is written. With
    `train_curve=False` the baseline part trains nothing: the curve holds the budgets the ledger
    has finished, the others are listed as pending, and the entries are placed on it."""
    import torch  # as the modules marked below

    from .report import build_report  # imports torch
    from .runlog import git_commit  # imports torch

    work = Path(work)
    t0 = time.time()
    out_path = Path(out_json)
    if budgets and sorted(budgets) != sorted(t.budgets):
        return baseline_curve(t, work, track_data(t, work), jobs, threads, ledger_of(out_path), budgets, train_curve)
    results: dict[str, Any] = read_json(out_path, TrackError) if out_path.is_file() else {}
    data = track_data(t, work)
    results["track"] = {**asdict(t), "rules": __doc__.split("Rules (also in the README):")[1].split("`run_track`")[0].strip()}
    results["machine"] = {"processor": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version(), "git_commit": git_commit()}
    curve_file = out_path.parent / "curves" / f"cpu_{t.curve_recipe}.json"
    if "baseline" in parts or "curve" in parts:
        # the committed form in both files: no machine-local paths, no per-point config (the ledger has them)
        curve_dict = committed_curve(baseline_curve(t, work, data, jobs, threads, ledger_of(out_path), train=train_curve))
        atomic_write_json(curve_file, curve_dict)
    elif curve_file.is_file():
        curve_dict = read_checked(curve_file, CURVE, TrackError)
    else:
        raise TrackError(f"no baseline curve yet ({curve_file}): run `slowrun bench cpu-track --parts baseline` first")
    results["baseline_curve"] = {k: curve_dict.get(k) for k in ("name", "recipe", "tokens", "losses", "budget", "grid",
                                                                 "grid_by_budget", "fixed", "expand", "refine", "seeds",
                                                                 "chosen", "dataset", "budgets", "pending", "points")}
    if not results["baseline_curve"]["pending"]:
        del results["baseline_curve"]["pending"]
    results.pop("gpt2_curve", None)
    curve = Curve.load(str(curve_file))
    results["baseline_curve"]["fit"] = curve_fit(curve)
    second = Curve.load(t.gpt2_curve) if t.gpt2_curve and Path(t.gpt2_curve).is_file() else None
    if second is not None:
        results["gpt2_curve"] = {"file": t.gpt2_curve, "name": second.name, "tokens": second.tokens, "losses": second.losses,
                                 "fit": curve_fit(second)}
    runs = []
    first_member = RunDir(_entry_dir(work, "ensemble", t.ensemble, data)).member(0)
    for kind, entry in (("ensemble", t.ensemble), ("single", t.single), ("distill", t.distill)):
        same = (entry.recipe, entry.overrides) == (t.ensemble.recipe, t.ensemble.overrides)
        key = entry_key(entry, data)
        if kind in parts and results.get(kind, {}).get("entry_key") == key:
            print(f"{kind}: entry {key} is in {out_path} already: not trained again", flush=True)
        elif kind in parts:
            run_dir, res = run_entry(kind, entry, work, data, jobs, threads,
                                     first_member if same and kind != "ensemble" else None,
                                     [out_path.parent / name for name in ENTRY_LEDGERS], t.entry_threads)
            results[kind] = {**summarize_entry(kind, entry, run_dir, res), "entry_key": key}
        if kind in results:  # trained now or earlier: placed on the current curves from its stored losses
            s = place_entry(results[kind], curve, second)
            second_eff = f", {describe_efficiency(s['efficiency_second'])} on {second.name}" if second else ""
            spent = s.get("limit_spent_s")  # None: an entry stored before it was written (its basis says)
            print(f"{kind}: test loss {s['test_loss']:.4f} (bpb {s['test_bpb']:.4f}), "
                  f"efficiency {describe_efficiency(s)}{second_eff}, "
                  + (f"{spent / 60:.1f} of the {s['limit_s'] / 60:.0f} minutes allowed" if spent is not None
                     else f"{s['wall_s'] / 60:.1f} min") + f" ({s.get('limit_basis', 'wall')})"
                  + ("" if s.get("within_limit", True) else ": over the allowance"), flush=True)
            if Path(s["run_dir"]).is_dir():
                runs.append(s["run_dir"])
    if "throughput" in parts:
        from .speed import run as speed_run  # imports torch

        # one batch size for every recipe (the recipes' own differ), so that tokens/s compare steps of equal work
        ns = argparse.Namespace(recipes=["minimal", "baseline", "slowrun"], dtypes=["fp32", "bf16"], steps=6, warmup=2,
                                data=str(data.path), out=None, set=["train.batch_tokens=16384"])
        results["throughput"] = speed_run(ns)
    if "memory" in parts:
        results["memory"] = memory(t, work, data)
    results["wall_s_this_invocation"] = round(time.time() - t0, 1)
    atomic_write_json(out_path, results)
    # the entries are placed from the results file (their run directories may be on another machine); the
    # runs found here add their training curves
    build_report(runs, report_dir, title="slowrun CPU track", track_results=str(out_path))
    print(f"wrote {out_path} and {Path(report_dir) / 'index.html'}")
    return results
