"""`slowrun sweep`: a recipe over a grid of config values at several nested budgets.

For each budget (a multiple of the given dataset's training split) the command prepares a
nested dataset that shares val, test and tokenizer with it, trains every grid point there
(one run directory per point, named by the point and a hash of its full config, so a
finished point is never redone and a changed one never reused), and writes `curve.json`:
for each budget, the point chosen by *val* loss with its test loss, every point with its
run directory and config, the grid, and the dataset hashes. That file is a baseline curve
for `slowrun efficiency`. With `--fit-params`, the best loss per model size is fitted with
L(N) = A / N^alpha + E, E being the recipe's estimated loss at infinite compute.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import SlowrunError
from .config import build_config, config_to_dict
from .dataset import Dataset
from .efficiency import fit_power_law
from .jobs import TrainJob, run_jobs
from .prepare import PrepareConfig, prepare
from .storage import atomic_write_json


class SweepError(SlowrunError):
    pass


@dataclass
class SweepConfig:
    recipe: str
    data: str  # the 1x dataset; its manifest says how to prepare the larger budgets
    out: str
    budgets: list[float] = field(default_factory=lambda: [1.0])
    grid: dict[str, list] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    grid_by_budget: dict[float, dict[str, list]] = field(default_factory=dict)  # axes replaced at some budgets
    jobs: int = 1  # runs at a time (each its own process)
    threads: int = -1  # torch threads per run; -1 = torch's default
    fit_params: bool = False
    name: str = ""
    progress: bool = True


def budget_name(b: float) -> str:
    return f"{b:g}x"


def nested_dataset(base: Dataset, budget: float, out: Path, progress: bool = False) -> Dataset:
    """The dataset with `budget` x the base's training tokens, same source, val, test and tokenizer."""
    if budget == 1:
        return base
    params = dict(base.manifest["params"])
    tok = params["tokenizer"]
    if tok.startswith("bpe:"):
        tok = str(base.path / "tokenizer.json")  # shared, never retrained on a bigger training text
    train_tokens = int(round(base.num_tokens("train") * budget))
    cfg = PrepareConfig(source=params["source"], tokenizer=tok, train_tokens=train_tokens, val_tokens=params["val_tokens"],
                        test_tokens=params["test_tokens"], out=str(out), seed=params["seed"], separator=params.get("separator"),
                        text_field=params.get("text_field", "text"), data_files=params.get("data_files"), progress=progress)
    ds = Dataset.open(prepare(cfg))
    if ds.fingerprint != base.fingerprint:
        raise SweepError(f"{out}: val/test/tokenizer differ from {base.path}; budgets would not be comparable")
    return ds


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def point_id(point: dict[str, Any], full_config: dict) -> str:
    human = "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "default"
    digest = hashlib.sha256(json.dumps(full_config, sort_keys=True).encode()).hexdigest()[:8]
    return f"{human}-{digest}".replace("/", "_")


def plan(cfg: SweepConfig) -> tuple[list[TrainJob], Dataset]:
    out = Path(cfg.out)
    base = Dataset.open(cfg.data)
    jobs = []
    for b in cfg.budgets:
        if b <= 0:
            raise SweepError(f"--budgets: {b} is not a positive multiple")
        ds = nested_dataset(base, b, out / "data" / budget_name(b), progress=cfg.progress)
        for point in grid_points({**cfg.grid, **cfg.grid_by_budget.get(b, {})}):
            overrides = {**cfg.fixed, **point}
            resolved = build_config(cfg.recipe, {**overrides, "data.path": str(ds.path)})  # validates every key
            full = {"config": config_to_dict(resolved), "dataset": ds.manifest["files"]}
            run_dir = out / "runs" / budget_name(b) / point_id(point, full)
            jobs.append(TrainJob(run_dir, cfg.recipe, ds.path, overrides, {"budget": b, "point": point}))
    return jobs, base


def collect(jobs: list[TrainJob], base: Dataset, cfg: SweepConfig, failures: dict[Path, str]) -> dict:
    points = []
    for j in jobs:
        b = j.tag["budget"]
        rec = {"budget": b, "tokens": int(round(base.num_tokens("train") * b)), "point": j.tag["point"],
               "run_dir": str(j.run_dir), "overrides": j.overrides}
        if j.done():
            res = j.result()
            best = res["variants"][res["best"]]
            rec.update({"variant": res["best"], "val_loss": best["val_loss"], "test_loss": best.get("test_loss"),
                        "val_bpb": best["val_bpb"], "test_bpb": best.get("test_bpb"), "params": res["params"],
                        "wall_s": res["wall_s"], "config": res["config"]})
        else:
            rec.update({"val_loss": None, "error": failures.get(j.run_dir, "not run")})
        points.append(rec)
    chosen = []
    for b in cfg.budgets:
        ok = [p for p in points if p["budget"] == b and p.get("val_loss") is not None and math.isfinite(p["val_loss"])]
        if not ok:
            raise SweepError(f"budget {budget_name(b)}: no grid point finished")
        chosen.append(min(ok, key=lambda p: p["val_loss"]))
    curve = {
        "name": cfg.name or f"{Path(cfg.recipe).stem}-sweep",
        "description": f"best-on-val {cfg.recipe} over the grid at each budget (test loss of the chosen point)",
        "budget": base.num_tokens("train"),
        "tokens": [c["tokens"] for c in chosen],
        "losses": {"val": [c["val_loss"] for c in chosen],
                   **({"test": [c["test_loss"] for c in chosen]} if all(c["test_loss"] is not None for c in chosen) else {})},
        "dataset": base.fingerprint,
        "recipe": cfg.recipe, "grid": cfg.grid, "fixed": cfg.fixed, "budgets": cfg.budgets,
        "grid_by_budget": {budget_name(b): g for b, g in cfg.grid_by_budget.items()},
        "chosen": [{k: c[k] for k in ("budget", "point", "run_dir", "val_loss", "test_loss", "params")} for c in chosen],
        "points": points,
        "datasets": {budget_name(b): str(Path(cfg.out) / "data" / budget_name(b)) if b != 1 else str(base.path)
                     for b in cfg.budgets},
    }
    if cfg.fit_params:
        curve["scaling"] = fit_scaling(points)
    return curve


def fit_scaling(points: list[dict]) -> dict:
    """Best val loss per parameter count (over the other grid axes), fitted with L(N) = A/N^alpha + E."""
    by_n: dict[int, dict] = {}
    for p in points:
        if p.get("val_loss") is None:
            continue
        n = p["params"]
        if n not in by_n or p["val_loss"] < by_n[n]["val_loss"]:
            by_n[n] = p
    ns = sorted(by_n)
    rows = [{"params": n, "val_loss": by_n[n]["val_loss"], "test_loss": by_n[n]["test_loss"], "point": by_n[n]["point"]} for n in ns]
    out: dict[str, Any] = {"points": rows}
    if len(ns) >= 3:
        fit = fit_power_law([float(n) for n in ns], [by_n[n]["val_loss"] for n in ns])
        out["fit"] = {"A": fit.A, "alpha": fit.alpha, "E": fit.E, "form": "L(N) = A / N^alpha + E (val loss)"}
    return out


def sweep(cfg: SweepConfig) -> dict:
    t0 = time.time()
    jobs, base = plan(cfg)
    done = sum(j.done() for j in jobs)
    print(f"sweep: {len(jobs)} runs ({done} already finished) over {len(cfg.budgets)} budget(s) in {cfg.out}", flush=True)
    # largest budget first: the longest runs start early, so parallel slots do not idle at the end
    order = sorted(jobs, key=lambda j: -j.tag["budget"])
    failures = run_jobs(order, cfg.jobs, cfg.threads, cfg.progress, desc="sweep")
    curve = collect(jobs, base, cfg, failures)
    curve["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(Path(cfg.out) / "curve.json", curve)
    return curve


def describe(curve: dict) -> str:
    metric = "test" if "test" in curve["losses"] else "val"
    lines = [f"{'budget':>8} {'tokens':>12} {'val loss':>9} {metric + ' loss':>10}  chosen point"]
    for c in curve["chosen"]:
        lines.append(f"{budget_name(c['budget']):>8} {int(round(c['budget'] * curve['budget'])):>12,} {c['val_loss']:>9.4f} "
                     f"{(c['test_loss'] if c['test_loss'] is not None else float('nan')):>10.4f}  "
                     + ", ".join(f"{k}={v}" for k, v in c["point"].items()))
    if "scaling" in curve and "fit" in curve["scaling"]:
        f = curve["scaling"]["fit"]
        lines.append(f"L(N) = {f['A']:.4g} / N^{f['alpha']:.4f} + {f['E']:.4f}: estimated loss at infinite compute E = {f['E']:.4f}")
    return "\n".join(lines)
