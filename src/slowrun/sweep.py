"""`slowrun sweep`: a recipe over a grid of config values at several nested budgets.

For each budget (a multiple of the given dataset's training split) the command prepares a
nested dataset that shares val, test and tokenizer with it, trains every grid point there
(one run directory per point, named by the point and a hash of its full config, so a
finished point is never redone and a changed one never reused), and writes `curve.json`:
for each budget, the point chosen by *val* loss with its test loss, every point with its
run directory and config, the grid, and the dataset hashes. That file is a baseline curve
for `slowrun efficiency`. With `--fit-params`, the best loss per model size is fitted with
L(N) = A / N^alpha + E, E being the recipe's estimated loss at infinite compute.

Tuning the way the reference benchmark tunes its baseline, and a bit stricter:
- `expand`: an integer axis (model.depth) is extended while a budget's best point sits at
  the edge of the values tried there, so the chosen size is never the smallest or largest;
- `refine`: at the given budgets the chosen point is also run with a key scaled by factors
  (the learning rate at 0.5x and 2x); a better one on val is chosen instead, and said;
- `seeds`: the chosen point of every budget is run with more seeds; the curve uses the
  mean of their losses and reports the spread.
With `ledger`, every finished run is appended to a JSON Lines file (`slowrun.ledger`) and a
run found there is done on any machine: a sweep stopped at any moment loses only the runs
in flight.

A budget with a failed run is not complete: its later phases are not run, it stays out of
the curve (named under `pending`, the point with its error), and the sweep raises
`JobsFailed` naming every failed run once the curve of the other budgets is written.
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

import torch

from . import SlowrunError
from .checkpoint import checkpoint_step, list_checkpoints
from .config import build_config, config_to_dict
from .dataset import Dataset
from .efficiency import EfficiencyError, fit_power_law
from .gpt import GPT
from .jobs import JobsFailed, TrainJob, run_jobs
from .ledger import Ledger, config_key, dataset_identity, entry_from_result
from .prepare import PrepareConfig, prepare
from .steps import step_plan
from .storage import atomic_write_json
from .train import resolve


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
    ledger: str = ""  # JSON Lines file of finished runs shared by every machine; "" = none
    expand: str = ""  # integer grid axis extended while a budget's best point is at its edge; "" = none
    expand_min: int = 1  # smallest value the expanded axis may take
    refine: dict[float, dict[str, list[float]]] = field(default_factory=dict)  # budget -> {key: factors} for the chosen point
    seeds: int = 1  # seeds of the chosen point at every budget (seed 0 is the tuning run)
    gpus_per_job: int = 1  # CUDA devices per run (torchrun inside a run when > 1); ignored on CPU


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
                        text_field=params.get("text_field", "text"), data_files=params.get("data_files"),
                        encoding=params.get("encoding", "utf-8"), progress=progress)
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


class Runs:
    """The sweep's runs: datasets per budget, jobs by point, finished results (from the ledger
    or the run directories), and the ledger they are appended to as they finish."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.base = Dataset.open(cfg.data)
        self.ledger = Ledger.open(cfg.ledger) if cfg.ledger else None
        self.datasets: dict[float, Dataset] = {}
        for b in cfg.budgets:
            if b <= 0:
                raise SweepError(f"--budgets: {b} is not a positive multiple")
            self.datasets[b] = nested_dataset(self.base, b, Path(cfg.out) / "data" / budget_name(b), progress=cfg.progress)
        self.jobs: list[TrainJob] = []
        self.configs: dict[Path, Any] = {}  # run_dir -> the RunConfig the run will record
        self.results: dict[Path, dict] = {}  # run_dir -> ledger entry of a finished run
        self.failures: dict[Path, str] = {}
        self.from_ledger = 0

    def job(self, budget: float, point: dict[str, Any], phase: str = "grid", recipe: str | None = None) -> TrainJob:
        """The job of a point at a budget (the same object when asked twice); `phase` says
        which step of the tuning asked for it first (grid, expand, refine, seeds); `recipe`, where
        given, trains the point on another recipe than the sweep's (an ablation's recipe swap)."""
        recipe = recipe or self.cfg.recipe
        for j in self.jobs:
            if j.tag["budget"] == budget and j.tag["point"] == point and j.recipe == recipe:
                return j
        ds = self.datasets[budget]
        overrides = {**self.cfg.fixed, **point}
        planned = build_config(recipe, {**overrides, "data.path": str(ds.path)})  # validates every key
        resolved = resolve(planned, ds)  # as the run will record it (vocabulary from the dataset)
        # names the run directory: the config as the ledger keys it (defaults left out), so that a config
        # field added later does not move a run in flight away from its checkpoints
        full = {"config": config_key(config_to_dict(planned)), "dataset": ds.manifest["files"]}
        name = point_id(point, full) if recipe == self.cfg.recipe else f"{Path(recipe).stem}_{point_id(point, full)}"
        run_dir = Path(self.cfg.out) / "runs" / budget_name(budget) / name
        job = TrainJob(run_dir, recipe, ds.path, overrides,
                       {"budget": budget, "point": point, "phase": phase, "key": config_key(config_to_dict(resolved)),
                        "dataset": dataset_identity(ds.manifest)})
        self.jobs.append(job)
        self.configs[run_dir] = resolved
        self._lookup(job)
        return job

    def _lookup(self, job: TrainJob) -> None:
        entry = self.ledger.find(job.tag["key"], job.tag["dataset"]) if self.ledger is not None else None
        if entry is not None:
            self.results[job.run_dir] = entry
            self.from_ledger += 1
        elif job.done():  # finished here before it reached a ledger: record it now
            self._finished(job)

    def _finished(self, job: TrainJob) -> None:
        result = job.result()
        if result["dataset"].get("train") is None:  # written before results carried the train hash: the run
            result["dataset"]["train"] = job.tag["dataset"]["train"]  # directory's name pins this job's dataset
        entry = entry_from_result(result, {"budget": job.tag["budget"], "point": job.tag["point"],
                                           "recipe": job.recipe, "sweep": self.cfg.name})
        if entry["key"] != job.tag["key"] or entry["dataset"] != job.tag["dataset"]:
            raise SweepError(f"{job.run_dir}: its result.json is of another config or dataset than the sweep plans")
        if self.ledger is not None:
            self.ledger.append(entry)
        self.results[job.run_dir] = entry

    def run(self, jobs: list[TrainJob], desc: str) -> None:
        todo = [j for j in jobs if j.run_dir not in self.results]
        # largest budget first: the longest runs start early, so parallel slots do not idle at the end
        todo.sort(key=lambda j: -j.tag["budget"])
        if todo:
            print(f"{desc}: {len(todo)} run(s) to train", flush=True)
        self.failures.update(run_jobs(todo, self.cfg.jobs, self.cfg.threads, self.cfg.progress, desc=desc,
                                      on_done=self._finished, gpus_per_job=self.cfg.gpus_per_job))

    def whole(self) -> list[float]:
        """The budgets with no failed run (a failed one's later phases would tune on a partial grid)."""
        failed = {j.tag["budget"] for j in self.jobs if j.run_dir in self.failures}
        return [b for b in self.cfg.budgets if b not in failed]

    def loss(self, job: TrainJob, split: str = "val") -> float | None:
        e = self.results.get(job.run_dir)
        if e is None:
            return None
        v = e["variants"][e["best"]].get(f"{split}_loss")
        return v if v is not None and math.isfinite(v) else None

    def tuning(self, budget: float) -> list[TrainJob]:
        """The finished seed-0 points of a budget (the candidates for its chosen point)."""
        return [j for j in self.jobs if j.tag["budget"] == budget and "train.seed" not in j.tag["point"]
                and self.loss(j) is not None]

    def best(self, budget: float, before_refine: bool = False) -> TrainJob:
        ok = [j for j in self.tuning(budget) if not (before_refine and j.tag["phase"] == "refine")]
        if not ok:
            raise SweepError(f"budget {budget_name(budget)}: no grid point finished")
        return min(ok, key=self.loss)

    def value(self, job: TrainJob, key: str) -> Any:
        sec, _, name = key.partition(".")
        return self.results[job.run_dir]["config"][sec][name]


def expansions(runs: Runs, budgets: list[float] | None = None) -> list[TrainJob]:
    """Points that move a budget's best off the edge of the expanded axis: the next value past
    each edge-bound best, finished already (the ledger) or not; the caller trains the rest and
    asks again, so the frontier walks through finished points as through new ones."""
    axis, out = runs.cfg.expand, []
    for b in runs.cfg.budgets if budgets is None else budgets:
        best = runs.best(b)
        v = runs.value(best, axis)
        tried = {runs.value(j, axis) for j in runs.tuning(b)}
        for nxt in ((v + 1,) if v == max(tried) else ()) + ((v - 1,) if v == min(tried) and v - 1 >= runs.cfg.expand_min else ()):
            job = runs.job(b, {**best.tag["point"], axis: nxt}, "expand")
            if job.run_dir not in runs.failures:
                out.append(job)
    return out


EXPAND_ROUNDS = 8  # the most values the expanded axis grows by in one sweep


def expand(runs: Runs, rounds: int = EXPAND_ROUNDS) -> None:
    """Grow the expanded axis until every budget's best is inside it (each round moves every
    edge-bound budget by one value; points already finished cost nothing)."""
    for _ in range(rounds):
        extra = expansions(runs, runs.whole())
        if not extra:
            return
        runs.run(extra, f"expand {runs.cfg.expand}")


def refinements(runs: Runs, budgets: list[float] | None = None) -> list[TrainJob]:
    out = []
    for b, keys in runs.cfg.refine.items():
        if b not in runs.datasets:
            raise SweepError(f"refine: budget {budget_name(b)} is not one of the sweep's budgets")
        if budgets is not None and b not in budgets:
            continue
        best = runs.best(b)
        for key, factors in keys.items():
            for f in factors:
                out.append(runs.job(b, {**best.tag["point"], key: runs.value(best, key) * f}, "refine"))
    return out


def seed_jobs(runs: Runs, budgets: list[float]) -> list[TrainJob]:
    return [runs.job(b, {**runs.best(b).tag["point"], "train.seed": s}, "seeds") for b in budgets
            for s in range(1, runs.cfg.seeds)]


@dataclass
class Pending:
    """A budget's next step: the unfinished runs of its first unfinished phase."""
    budget: float
    phase: str  # grid, expand, refine, seeds; "done" with no jobs
    jobs: list[TrainJob]


def plan(cfg: SweepConfig) -> tuple[Runs, list[Pending]]:
    """What the sweep would train next, training nothing: per budget, the runs of the first
    phase (grid, expand, refine, seeds) not yet finished here or in the ledger. Later phases
    depend on these runs' losses, so they are not listed."""
    runs = Runs(cfg)
    return runs, [Pending(b, *_next_phase(runs, b)) for b in cfg.budgets]


def _next_phase(runs: Runs, b: float) -> tuple[str, list[TrainJob]]:
    cfg = runs.cfg

    def todo(jobs: list[TrainJob]) -> list[TrainJob]:
        return [j for j in jobs if j.run_dir not in runs.results]

    grid = todo([runs.job(b, p) for p in grid_points({**cfg.grid, **cfg.grid_by_budget.get(b, {})})])
    if grid:
        return "grid", grid
    if cfg.expand:
        for _ in range(EXPAND_ROUNDS):  # as `expand`: the frontier walks through finished points
            extra = expansions(runs, [b])
            if not extra:
                break
            if todo(extra):
                return "expand", todo(extra)
    refine = todo(refinements(runs, [b]))
    if refine:
        return "refine", refine
    seeds = todo(seed_jobs(runs, [b])) if cfg.seeds > 1 else []
    return ("seeds", seeds) if seeds else ("done", [])


def run_size(runs: Runs, job: TrainJob) -> tuple[int, int, int]:
    """(parameters, tokens it will train on, tokens per step) of a planned run, from its config
    (the trainer's steps, `steps.step_plan`); no weights allocated."""
    ds, cfg = runs.datasets[job.tag["budget"]], runs.configs[job.run_dir]
    with torch.device("meta"):
        params = GPT(cfg.model).num_params()
    s = step_plan(cfg, ds.num_tokens("train"))
    return params, s.total_steps * s.tokens_per_step, s.tokens_per_step


def seconds_per_param_token(runs: Runs) -> tuple[float, int] | None:
    """Median training wall time per (parameter x token) of the ledger's runs on a CPU at this
    sweep's thread count, and how many runs it is the median of; None without such runs."""
    if runs.ledger is None:
        return None
    rates = sorted(e["train_wall_s"] / (e["params"] * e["tokens_seen"]) for e in runs.ledger.entries
                   if str(e.get("device", "")).startswith("cpu") and e.get("train_wall_s") and e.get("params")
                   and e.get("tokens_seen") and (runs.cfg.threads <= 0 or e.get("threads") == runs.cfg.threads))
    return (rates[len(rates) // 2], len(rates)) if rates else None


def describe_plan(runs: Runs, pending: list[Pending]) -> str:
    """The plan as lines: a budget's next runs with their size and, from the ledger's CPU runs,
    an estimate of their CPU hours."""
    rate = seconds_per_param_token(runs)
    lines, total, n = [], 0.0, 0
    for p in pending:
        if not p.jobs:
            lines.append(f"{budget_name(p.budget):>6}  done")
            continue
        for j in p.jobs:
            params, tokens, batch = run_size(runs, j)
            ckpts = list_checkpoints(j.run_dir)
            done = checkpoint_step(ckpts[-1]) * batch if ckpts else 0
            left = max(0.0, 1.0 - done / tokens) if done else 1.0  # a started run resumes from its checkpoint
            hours = rate[0] * params * tokens * left / 3600 if rate else None
            total += hours or 0.0
            n += 1
            point = ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in j.tag["point"].items())
            lines.append(f"{budget_name(p.budget):>6}  {p.phase:<7} {point:<44} {params / 1e6:7.2f}M params  "
                         f"{tokens:>11,} tokens" + (f"  ~{hours:.1f} CPU h" if hours is not None else "")
                         + (f" (resumes at {done / tokens:.0%}: {ckpts[-1].name})" if done else ""))
    head = f"plan: {n} run(s) next (nothing trained); later phases depend on their losses"
    if rate and n:
        head += (f"\n~{total:.1f} CPU hours at {runs.cfg.threads if runs.cfg.threads > 0 else 'default'} thread(s) per run, "
                 f"from {rate[0] * 1e12:.0f} s per 1e12 parameter-tokens (median of {rate[1]} CPU run(s) in the ledger)")
    return "\n".join([head, *lines])


def sweep(cfg: SweepConfig, train: bool = True) -> dict:
    """Train what the sweep still needs and write its curve.json. With `train=False` nothing is
    trained: the curve is built from the runs finished so far (here or in the ledger) and holds
    only the budgets whose every phase is finished; the others are named under `pending` with
    their next phase, so a curve measured over several sessions can be used before it is whole."""
    if not train:
        runs, pending = plan(cfg)
        complete = [p.budget for p in pending if p.phase == "done"]
        if not complete:
            raise SweepError("no budget is complete yet (" + ", ".join(
                f"{budget_name(p.budget)}: {p.phase}" for p in pending) + "); `--plan` shows what each needs")
        curve = collect(runs, complete)
        curve["pending"] = {budget_name(p.budget): f"{p.phase}, {len(p.jobs)} run(s) to train"
                            for p in pending if p.phase != "done"}
        atomic_write_json(Path(cfg.out) / "curve.json", curve)
        return curve
    t0 = time.time()
    runs = Runs(cfg)
    for b in cfg.budgets:
        for point in grid_points({**cfg.grid, **cfg.grid_by_budget.get(b, {})}):
            runs.job(b, point)
    print(f"sweep: {len(runs.jobs)} grid runs ({len(runs.results)} already finished, {runs.from_ledger} of them found in "
          f"the ledger) over {len(cfg.budgets)} budget(s) in {cfg.out}", flush=True)
    runs.run(list(runs.jobs), "grid")
    if cfg.expand:
        expand(runs)
    if cfg.refine:
        runs.run(refinements(runs, runs.whole()), "refine")
    if cfg.seeds > 1:
        runs.run(seed_jobs(runs, runs.whole()), "seeds")
    whole = runs.whole()
    curve = None
    if whole:
        curve = collect(runs, whole)
        curve["wall_s"] = round(time.time() - t0, 1)
        for b in cfg.budgets:
            names = [j.run_dir.name.rsplit("-", 1)[0] for j in runs.jobs if j.tag["budget"] == b and j.run_dir in runs.failures]
            if names:
                curve.setdefault("pending", {})[budget_name(b)] = f"{len(names)} run(s) failed: {', '.join(names)}"
        atomic_write_json(Path(cfg.out) / "curve.json", curve)
    if runs.failures:
        failed = ", ".join(budget_name(b) for b in cfg.budgets if b not in whole)
        raise JobsFailed(runs.failures, f"budget(s) {failed} not complete, " + (
            f"left out of {Path(cfg.out) / 'curve.json'}" if whole else "no curve written"), partial=curve)
    return curve


def collect(runs: Runs, budgets: list[float] | None = None) -> dict:
    """The curve: every planned point, and the chosen point of each of `budgets` (default all)."""
    cfg, base = runs.cfg, runs.base
    points = []
    for j in runs.jobs:
        b = j.tag["budget"]
        rec = {"budget": b, "tokens": int(round(base.num_tokens("train") * b)), "point": j.tag["point"],
               "phase": j.tag["phase"], "run_dir": str(j.run_dir), "overrides": j.overrides, "key": j.tag["key"]}
        e = runs.results.get(j.run_dir)
        if e is not None:
            best = e["variants"][e["best"]]
            rec.update({"variant": e["best"], "val_loss": best["val_loss"], "test_loss": best.get("test_loss"),
                        "val_bpb": best["val_bpb"], "test_bpb": best.get("test_bpb"), "params": e["params"],
                        "wall_s": e["wall_s"], "device": e.get("device"), "config": e["config"]})
        else:
            rec.update({"val_loss": None, "error": runs.failures.get(j.run_dir, "not run")})
        points.append(rec)
    chosen = []
    for b in cfg.budgets if budgets is None else budgets:
        best = runs.best(b)
        seeds = [best] + [j for j in runs.jobs if j.tag["budget"] == b and runs.loss(j) is not None
                          and j.tag["point"].get("train.seed", 0) != 0
                          and {k: v for k, v in j.tag["point"].items() if k != "train.seed"} == best.tag["point"]]
        c = {"budget": b, "point": best.tag["point"], "run_dir": str(best.run_dir), "params": runs.results[best.run_dir]["params"],
             "seeds": len(seeds)}
        for split in ("val", "test"):
            vals = [runs.loss(j, split) for j in seeds]
            if any(v is None for v in vals):
                c[f"{split}_loss"] = None
                continue
            c[f"{split}_loss"] = sum(vals) / len(vals)  # the curve's point: the mean over seeds
            c[f"{split}_losses"] = vals
            c[f"{split}_spread"] = max(vals) - min(vals)
        if cfg.expand:  # still at an edge after the expansion rounds: said, not hidden
            v, tried = runs.value(best, cfg.expand), {runs.value(j, cfg.expand) for j in runs.tuning(b)}
            if v == max(tried) or (v == min(tried) and v > cfg.expand_min):
                c["at_edge"] = f"{cfg.expand}={v} is the {'largest' if v == max(tried) else 'smallest'} value tried"
        grid_best = runs.best(b, before_refine=True)
        if grid_best is not best:
            c["refined_from"] = grid_best.tag["point"]  # a refinement beat the grid's best on val: said, not hidden
        chosen.append(c)
    curve = {
        "name": cfg.name or f"{Path(cfg.recipe).stem}-sweep",
        "description": f"best-on-val {cfg.recipe} over the grid at each budget (mean over {cfg.seeds} seed(s) of the "
                       f"chosen point; test loss of the chosen point)",
        "budget": base.num_tokens("train"),
        "tokens": [int(round(base.num_tokens("train") * c["budget"])) for c in chosen],
        "losses": {"val": [c["val_loss"] for c in chosen],
                   **({"test": [c["test_loss"] for c in chosen]} if all(c["test_loss"] is not None for c in chosen) else {})},
        "dataset": base.fingerprint,
        "recipe": cfg.recipe, "grid": cfg.grid, "fixed": cfg.fixed, "budgets": cfg.budgets,
        "grid_by_budget": {budget_name(b): g for b, g in cfg.grid_by_budget.items()},
        "expand": cfg.expand, "refine": {budget_name(b): r for b, r in cfg.refine.items()}, "seeds": cfg.seeds,
        "chosen": chosen,
        "points": points,
        "datasets": {budget_name(b): str(ds.path) for b, ds in runs.datasets.items()},
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
    try:
        out["fit"] = fit_power_law([float(n) for n in ns], [by_n[n]["val_loss"] for n in ns]).as_dict()
    except EfficiencyError as e:  # too few sizes to fit and check a fit
        out["fit"] = {"status": f"no fit: {e}"}
    return out


def describe(curve: dict) -> str:
    metric = "test" if "test" in curve["losses"] else "val"
    lines = [f"{'budget':>8} {'tokens':>12} {'val loss':>9} {metric + ' loss':>10}  chosen point"]
    for c in curve["chosen"]:
        spread = f" ({c['seeds']} seeds, spread {c['test_spread']:.4f})" if c.get("seeds", 1) > 1 and "test_spread" in c else ""
        lines.append(f"{budget_name(c['budget']):>8} {int(round(c['budget'] * curve['budget'])):>12,} {c['val_loss']:>9.4f} "
                     f"{(c['test_loss'] if c['test_loss'] is not None else float('nan')):>10.4f}  "
                     + ", ".join(f"{k}={v}" for k, v in c["point"].items()) + spread
                     + (f" [refined from {c['refined_from']}]" if "refined_from" in c else "")
                     + (f" [AT THE EDGE: {c['at_edge']}]" if "at_edge" in c else ""))
    for b, why in curve.get("pending", {}).items():
        lines.append(f"{b:>8}  not in the curve yet: {why}")
    if "scaling" in curve and "fit" in curve["scaling"]:
        f = curve["scaling"]["fit"]
        if f["status"] == "ok":
            lines.append(f"L(N) = {f['A']:.4g} / N^{f['alpha']:.4f} + {f['E']:.4f} (rms residual {f['rms_residual']:.4f}): "
                         f"estimated loss at infinite compute E = {f['E']:.4f}")
        elif "rms_residual" in f:
            lines.append(f"L(N) = A / N^alpha + E: the fit {f['status']} (rms residual {f['rms_residual']:.4f})")
        else:
            lines.append(f"L(N) = A / N^alpha + E: {f['status']}")
    return "\n".join(lines)
