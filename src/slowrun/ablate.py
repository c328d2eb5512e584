"""`slowrun ablate`: what each technique of a recipe is worth, leave-one-out, over seeds.

Every technique the recipe turns on (found in its resolved config by the table
`TECHNIQUES`, the ablation switches that `slowrun.techniques` declares with each technique)
is switched off alone by that table's overrides; the full recipe and each
variant are trained with seeds 0..S-1 through the sweep machinery (`sweep.Runs`: one run
directory per config, a finished run is never redone, an interrupted one is resumed, every
finished run goes to the ledger when one is given). The answer, per technique: mean +- std
test loss without it, the delta vs the full recipe (> 0: the technique helps), the
one-sided Welch p-value of "removing it raises the test loss", val losses beside, the
data efficiency on a baseline curve if one is given, and wall time. Written as
`ablation.json` in the output directory and printed as a table; `slowrun report
--ablation FILE` draws the deltas with error bars.

Swaps (`variants`, `--variant NAME:key=value,...`) sit in the same table: the recipe with
something changed rather than removed (another matrix optimizer, a curriculum), over the
same seeds, with the one-sided Welch p of "the swap lowers the test loss" (`p_better`). A
swap's `recipe=OTHER` trains another recipe instead (with the swap's other overrides and the
fixed ones): a whole recipe against this one, e.g. a reference track's recipe at this scale.
With `equal_time` (`--equal-time`) each swap (but a recipe swap, which is sized to its own
length: its schedule may count epochs) trains for the full recipe's wall time rather than its
steps: the trainer's step times of the full recipe and of the swap are measured
(`slowrun.speed`, each in its own process, median of a few steps), round-robin beside each
other so that both see the same load, and the swap's `train.epochs` (or `train.max_steps`,
when the runs set it) is scaled by their ratio (a swap that changes the steps an epoch takes,
e.g. the batch size, by the ratio of wall time per epoch; a loop that switches on after the
first epoch, whose timed first steps run unlooped, is timed looped as well, and the swap gets
the epochs whose unlooped and looped parts together take the full recipe's time); a swap of the data order alone
(`ORDER_KEYS`, e.g. a curriculum) computes the recipe's steps and keeps its length untimed.
The measurements are kept in `equal_time.json` in the output directory (or
`equal_time_file`, e.g. a committed one), so a rerun, on any machine, plans the same runs
rather than re-timing them into new configs. They are keyed by the resolved configs timed
(the ledger's `config_key` of the full recipe and of the swap) and the threads: an edited
recipe is timed again, and overrides that resolve to the configs already timed (a value the
recipe changed since, pinned back by `--set`) find their times.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import SlowrunError
from .config import RunConfig, build_config, config_to_dict, parse_value
from .dataset import Dataset
from .efficiency import Curve, check_same_data, efficiency_on
from .jobs import JobsFailed
from .ledger import config_key
from .speed import SpeedError, measure_in_process
from .steps import step_plan
from .storage import atomic_write_json, read_json
from .sweep import Runs, SweepConfig
from .techniques import Ablation, ablations

FORMAT = "slowrun-ablation/1"
EQUAL_TIME_FORMAT = "slowrun-equal-time/3"
EQUAL_TIME_STEPS, EQUAL_TIME_WARMUP = 6, 2  # timed steps (median) after untimed ones
EQUAL_TIME_ROUNDS = 3  # the full recipe and the swaps timed round-robin, this many times (median of each)
# keys that change only which tokens a step sees, never what it computes: a swap of these alone
# has the recipe's step time by construction, so it is not timed (timing noise of a few percent
# would otherwise cut its run short of the recipe's)
ORDER_KEYS = ("data.curriculum", "data.curriculum_score", "data.curriculum_blocks", "data.doc_shuffle", "data.seq_shuffle")
# keys that change how many steps an epoch takes: a swap of these at equal time scales its epochs by
# wall time per epoch (step time x steps per epoch), not by step time alone
EPOCH_KEYS = ("train.batch_tokens", "model.seq_len", "data.fitness_tokens")
# a swap's key that names another recipe to train (not a config key)
RECIPE_KEY = "recipe"
# a loop that starts after the first epoch is also timed with these overrides: looped from the first step
LOOPED_FROM_START = {"model.loop_from_epoch": 0}


class AblateError(SlowrunError):
    pass


# the leave-one-out list, declared with each technique in slowrun/techniques.py: name, what off means,
# whether a config has it on, the overrides that turn it off
TECHNIQUES: tuple[Ablation, ...] = ablations()
NAMES = tuple(t.name for t in TECHNIQUES)


@dataclass
class AblateConfig:
    recipe: str
    data: str
    out: str
    seeds: int = 3  # seeds 0..seeds-1 of the full recipe and of every variant
    only: list[str] = field(default_factory=list)  # technique names; empty = every technique that is on
    fixed: dict[str, Any] = field(default_factory=dict)  # overrides of every run (the full recipe's too)
    jobs: int = 1
    threads: int = -1
    ledger: str = ""
    curve: str = ""  # a baseline curve to place every variant on; "" = none
    progress: bool = True
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # swaps: name -> overrides
    equal_time: bool = False  # swaps train for the full recipe's wall time (their epochs scaled by measured step times)
    equal_time_file: str = ""  # where the measured step times are kept; "" = OUT/equal_time.json
    train: bool = True  # False: the table of the runs finished so far (ledger or run directories), nothing trained


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME:key=value,key=value` (values as TOML literals) -> (name, overrides)."""
    name, sep, body = text.partition(":")
    pairs = [x for x in body.split(",") if x.strip()]
    if not sep or not name.strip() or not pairs or any("=" not in x for x in pairs):
        raise AblateError(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    return name.strip(), {k.strip(): parse_value(v.strip()) for k, v in (x.split("=", 1) for x in pairs)}


def swap_recipe(cfg: AblateConfig, over: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the recipe a swap trains, its config overrides): `recipe=OTHER` in a swap names another
    recipe (a name or a .toml path); without it, the ablated recipe."""
    rest = {k: v for k, v in over.items() if k != RECIPE_KEY}
    recipe = over.get(RECIPE_KEY, cfg.recipe)
    if not isinstance(recipe, str) or not recipe:
        raise AblateError(f"--variant ...:recipe={recipe!r}: expected a recipe's name or path")
    return recipe, rest


def techniques_on(cfg: RunConfig, only: list[str] | None = None) -> list[Ablation]:
    """The techniques the config turns on (in table order), or the named ones, each checked;
    `["none"]`: no technique (the swaps alone)."""
    on = [t for t in TECHNIQUES if t.is_on(cfg)]
    if not only:
        return on
    if only == ["none"]:
        return []
    for name in only:
        if name not in NAMES:
            raise AblateError(f"--only {name}: not a technique (known: {', '.join(NAMES)})")
        if name not in {t.name for t in on}:
            raise AblateError(f"--only {name}: not on in this recipe (on: {', '.join(t.name for t in on) or 'none'})")
    return [t for t in on if t.name in only]


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def welch_hurts(without: list[float], full: list[float]) -> float | None:
    """One-sided Welch p of H1: mean(without) > mean(full) (removing the technique hurts;
    with the arguments swapped: a swap is better than the full recipe); None with fewer than 2
    values on a side or no variance at all."""
    from scipy import stats

    if len(without) < 2 or len(full) < 2:
        return None
    p = float(stats.ttest_ind(without, full, equal_var=False, alternative="greater").pvalue)
    return p if math.isfinite(p) else None


def step_time(recipe: str, data: str, overrides: dict[str, Any], dtype: str, threads: int) -> float:
    """Median step time (s) of the trainer on `recipe` + `overrides` (`speed.measure_in_process`)."""
    over = {**overrides, **({"train.num_threads": threads} if threads > 0 else {})}
    try:
        row = measure_in_process(recipe, dtype, EQUAL_TIME_STEPS, EQUAL_TIME_WARMUP, data,
                                 [f"--{k}={json.dumps(v)}" for k, v in over.items()])
    except SpeedError as e:
        raise AblateError(str(e)) from None
    return float(row["step_s_median"])


def equal_time_config_key(recipe: str, overrides: dict[str, Any]) -> str:
    """The ledger's key of the config that `recipe` + `overrides` resolve to (what a step time is of)."""
    return config_key(config_to_dict(build_config(recipe, overrides)))


def equal_time_overrides(cfg: AblateConfig, base: RunConfig, measure: Callable[..., float] | None = None,
                         ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """(each swap's overrides plus the run length that gives it the full recipe's wall time,
    each timed swap's step time and the full recipe's beside it: {"step_s", "full_step_s"}).

    The length is `train.epochs` (or `train.max_steps` when the runs set it) x full step time /
    swap step time (for epochs, times too the full recipe's steps per epoch / the swap's, where
    the swap changes them). The swaps not timed yet are timed together with the full recipe,
    round-robin (full, swap, swap, ..., EQUAL_TIME_ROUNDS times; the median of each), so that a
    ratio never compares timings taken under different loads of the machine (measured here: the
    full recipe's step at 2.34 s and 1.57 s, an hour apart). The times are kept in the
    equal-time file (keyed by what was timed), so that a rerun plans the same runs."""
    measure = measure or step_time
    path = Path(cfg.equal_time_file or Path(cfg.out) / "equal_time.json")
    cache: dict[str, Any] = {}
    if path.is_file():
        saved = read_json(path, AblateError)
        try:
            cache = saved["step_s"]
        except (KeyError, TypeError) as e:
            raise AblateError(f"{path}: not an equal-time file of slowrun ablate ({e}); move it away to time again") from None
        if saved.get("format") != EQUAL_TIME_FORMAT:
            # /1 timed each config alone (not comparable); /2 keyed the overrides asked for, not the configs they
            # resolve to (a recipe edited since would reuse times of its old configs): timed again
            print(f"ablate: {path} holds step times of {saved.get('format')}, not keyed by the configs timed; timing "
                  f"the swaps again beside the full recipe ({EQUAL_TIME_FORMAT})", flush=True)
            cache = {}
    by_steps = base.train.max_steps > 0
    length_key = "train.max_steps" if by_steps else "train.epochs"

    full_key = equal_time_config_key(cfg.recipe, cfg.fixed)
    from .distributed import compute_dtype, resolve_device  # imports torch

    # the precision the runs train in here (fp32 for bf16 where the device has no bf16 arithmetic): what is timed
    dtype = compute_dtype(base.train.dtype, resolve_device(base.train.device))

    def key(over: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        what = {"full_config": full_key, "swap_config": equal_time_config_key(cfg.recipe, {**cfg.fixed, **over}),
                "threads": cfg.threads}
        if dtype != base.train.dtype:  # times of another precision than the config's are kept apart
            what["computed_dtype"] = dtype
        shown = {"recipe": cfg.recipe, "fixed": cfg.fixed, "overrides": over, "dtype": dtype}  # for a reader
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16], {**shown, **what}

    def epoch_steps(over: dict[str, Any]) -> float:  # optimizer steps per epoch, as the trainer counts them
        c = build_config(cfg.recipe, {**cfg.fixed, **over})
        return step_plan(c, Dataset.open(cfg.data).num_tokens("train")).steps_per_epoch

    def late_loop(over: dict[str, Any]) -> int:
        """The epoch a config's loop switches on at, where that is after the first (its first steps, the
        ones timed, then run unlooped: it is timed looped too); 0 = no loop, or one from the start."""
        m = build_config(cfg.recipe, {**cfg.fixed, **over}).model
        return m.loop_from_epoch if m.loop_start >= 0 and m.loop_from_epoch > 0 else 0

    # each config's late loop, built once: {} (None) is the full recipe's
    loops = {None: late_loop({}), **{n: late_loop(o) for n, o in cfg.variants.items() if RECIPE_KEY not in o}}
    if by_steps and any(loops.values()):
        raise AblateError("--equal-time: a loop that starts after the first epoch is timed per epoch; runs of "
                          "train.max_steps are not (set train.epochs instead)")

    timed, keys = {}, {}
    for name, over in cfg.variants.items():
        if RECIPE_KEY in over:  # another recipe, of its own length
            continue
        if length_key in over:
            raise AblateError(f"--variant {name}: sets {length_key}, which --equal-time sets from the measured step times")
        if not all(k in ORDER_KEYS for k in over):  # a swap of the data order alone keeps the recipe's length untimed
            timed[name], keys[name] = over, key(over)
    # a late loop's swap timed before without its looped step (or beside a full recipe timed without it) is timed again
    todo = {name: over for name, over in timed.items() if keys[name][0] not in cache
            or (loops[name] and "looped_step_s" not in cache[keys[name][0]])
            or (loops[None] and "full_looped_step_s" not in cache[keys[name][0]])}
    if todo and not cfg.train:  # timing runs the model: --no-train plans only from times already kept
        held = sorted({f"--threads {e.get('threads')}, {e.get('dtype')}" for e in cache.values()})
        raise AblateError(f"--no-train: {path} has no step times of {', '.join(todo)} at --threads {cfg.threads}, "
                          f"{dtype} (it holds {'; '.join(held) or 'none'}); run with the same --threads and "
                          "--set as the timed runs, or without --no-train to time them")
    if todo:
        def time_of(over: dict[str, Any]) -> float:
            return measure(cfg.recipe, cfg.data, {**cfg.fixed, **over}, dtype, cfg.threads)

        # (name, overrides, looped): the full recipe first (None), each swap, and each late loop looped as well
        timings = [(None, {}, False)] + [(None, {}, True)] * bool(loops[None])
        for name, over in todo.items():
            timings += [(name, over, False)] + [(name, over, True)] * bool(loops[name])
        got: dict[tuple[str | None, bool], list[float]] = {(n, lp): [] for n, _, lp in timings}
        for _ in range(EQUAL_TIME_ROUNDS):
            for name, over, lp in timings:
                got[(name, lp)].append(time_of({**over, **(LOOPED_FROM_START if lp else {})}))
        med = {k: statistics.median(v) for k, v in got.items()}
        for name in todo:
            k, what = keys[name]
            cache[k] = {**what, "step_s": med[(name, False)], "full_step_s": med[(None, False)], "rounds": EQUAL_TIME_ROUNDS}
            if (name, True) in med:
                cache[k]["looped_step_s"] = med[(name, True)]
            if (None, True) in med:
                cache[k]["full_looped_step_s"] = med[(None, True)]
        atomic_write_json(path, {"format": EQUAL_TIME_FORMAT, "step_s": cache})
    out, times = {}, {}
    for name, over in cfg.variants.items():
        if name not in timed:
            out[name] = dict(over)
            continue
        entry = cache[keys[name][0]]
        times[name] = {k: entry[k] for k in ("step_s", "full_step_s", "looped_step_s", "full_looped_step_s") if k in entry}
        if loops[name] or loops[None]:
            steps = (epoch_steps({}), epoch_steps(over)) if any(k in EPOCH_KEYS for k in over) else (1.0, 1.0)
            out[name] = {**over, length_key: _epochs_at_equal_time(base.train.epochs, entry, loops[None], loops[name],
                                                                  *steps)}
            continue
        scale = entry["full_step_s"] / entry["step_s"]
        if not by_steps and any(k in EPOCH_KEYS for k in over):  # an epoch of the swap takes another number of steps
            scale *= epoch_steps({}) / epoch_steps(over)
        length = max(1, round(base.train.max_steps * scale)) if by_steps else round(base.train.epochs * scale, 3)
        out[name] = {**over, length_key: length}
    return out, times


def _epochs_at_equal_time(full_epochs: float, t: dict[str, float], full_loop: int, swap_loop: int,
                          full_steps: float, swap_steps: float) -> float:
    """The swap's epochs whose time equals the full recipe's, where either loops from a later epoch
    (its epochs before that at the unlooped step time `step_s`, those after at `looped_step_s`):
    the full recipe's time summed epoch by epoch, then the swap's epochs filled up to it."""
    def per_epoch(step: str, looped: str, loop: int, steps: float) -> tuple[float, float, int]:
        return t[step] * steps, (t[looped] if loop else t[step]) * steps, loop

    off, on, loop = per_epoch("full_step_s", "full_looped_step_s", full_loop, full_steps)
    total = min(full_epochs, loop) * off + max(0.0, full_epochs - loop) * on if loop else full_epochs * off
    off, on, loop = per_epoch("step_s", "looped_step_s", swap_loop, swap_steps)
    if not loop or total <= loop * off:
        return round(total / off, 3)
    return round(loop + (total - loop * off) / on, 3)


def ablate(cfg: AblateConfig) -> dict:
    if cfg.seeds < 1:
        raise AblateError(f"--seeds: must be >= 1, got {cfg.seeds}")
    t0 = time.time()
    base = build_config(cfg.recipe, {**cfg.fixed, "data.path": cfg.data})
    if not base.eval.test:
        raise AblateError("eval.test is off in this recipe: ablations compare test losses (pass --set eval.test=true)")
    if "train.seed" in cfg.fixed:
        raise AblateError("--set train.seed: the seeds are 0..--seeds-1")
    techs = techniques_on(base, cfg.only)
    curve = Curve.load(cfg.curve) if cfg.curve else None
    runs = Runs(SweepConfig(cfg.recipe, cfg.data, cfg.out, budgets=[1.0], fixed=cfg.fixed, jobs=cfg.jobs, threads=cfg.threads,
                            name=f"ablate-{Path(cfg.recipe).stem}", progress=cfg.progress, ledger=cfg.ledger))
    if curve is not None:
        check_same_data(curve, runs.base.fingerprint)
    variants: list[tuple[str, str, dict[str, Any]]] = [("full", "the recipe as it is", {})]
    variants += [(t.name, t.what, t.off(base)) for t in techs]
    for name, over in cfg.variants.items():
        if name in {v[0] for v in variants}:
            raise AblateError(f"--variant {name}: the name of a technique or another variant")
        recipe, rest = swap_recipe(cfg, over)
        build_config(recipe, {**cfg.fixed, **rest, "data.path": cfg.data})  # a wrong key fails before any run
    swap_overrides, times = equal_time_overrides(cfg, base) if cfg.equal_time else (cfg.variants, {})
    for name, over in swap_overrides.items():
        variants.append((name, "swap: " + ", ".join(f"{k}={v}" for k, v in over.items()), over))
    swaps = set(cfg.variants)

    def job(name: str, over: dict[str, Any], seed: int):
        recipe, rest = swap_recipe(cfg, over)
        return runs.job(1.0, {**rest, "train.seed": seed}, name, recipe)

    jobs = {name: [job(name, off, s) for s in range(cfg.seeds)] for name, _, off in variants}
    print(f"ablate: {len(variants) - 1} technique(s) and swap(s) x {cfg.seeds} seed(s) + the full recipe = {len(runs.jobs)} runs "
          f"({len(runs.results)} already finished, {runs.from_ledger} of them found in the ledger) in {cfg.out}", flush=True)
    if cfg.train:
        runs.run(list(runs.jobs), "ablate")

    metric = curve.metric() if curve is not None else "test"
    rows = []
    for name, what, off in variants:
        rec: dict[str, Any] = {"technique": name, "what": what, "off": off,
                               "run_dirs": [str(j.run_dir) for j in jobs[name]]}
        for split in ("test", "val"):
            vals = [v for v in (runs.loss(j, split) for j in jobs[name]) if v is not None]
            rec[f"{split}_losses"] = vals
            rec[f"{split}_mean"], rec[f"{split}_std"] = _stats(vals)
        rec["seeds"] = len(rec["test_losses"])
        walls = [runs.results[j.run_dir]["wall_s"] for j in jobs[name] if j.run_dir in runs.results]
        rec["wall_s"] = round(sum(walls) / len(walls), 1) if walls else None
        rec.update(times.get(name, {}))  # the step times the equal-time scaling used
        failed = [runs.failures[j.run_dir] for j in jobs[name] if j.run_dir in runs.failures]
        if failed:
            rec["errors"] = failed
        if curve is not None:  # interpolated, else extrapolated and marked so, else None with the reason
            rec.update(efficiency_on(curve, rec[f"{metric}_mean"], metric) if rec[f"{metric}_mean"] is not None
                       else {"efficiency": None, "efficiency_error": "no finished run"})
        else:
            rec["efficiency"] = None
        rows.append(rec)
    full = rows[0]
    if full["test_mean"] is None and cfg.train:
        if runs.failures:
            raise JobsFailed(runs.failures, "the full recipe finished no run: no table written")
        raise AblateError("the full recipe finished no run: no test loss")
    for rec in rows[1:]:
        for split in ("test", "val"):
            m, f = rec[f"{split}_mean"], full[f"{split}_mean"]
            rec[f"delta_{split}"] = m - f if m is not None and f is not None else None
        # on test (the figure reported) and on val (what the track decides on)
        if rec["technique"] in swaps:
            rec["swap"] = True
            rec["p_better"] = welch_hurts(full["test_losses"], rec["test_losses"])
            rec["p_better_val"] = welch_hurts(full["val_losses"], rec["val_losses"])
        else:
            rec["p_hurts"] = welch_hurts(rec["test_losses"], full["test_losses"])
            rec["p_hurts_val"] = welch_hurts(rec["val_losses"], full["val_losses"])
    out = {
        "format": FORMAT, "recipe": cfg.recipe, "data": str(cfg.data), "dataset": runs.base.fingerprint, "seeds": cfg.seeds,
        "fixed": cfg.fixed, "curve": curve.name if curve is not None else None, "efficiency_metric": metric,
        "full": full, "variants": rows[1:], "equal_time": cfg.equal_time,
        # what the table's runs cost (the sum of their walls, wherever they ran), and this call alone (a call that
        # trains nothing, --no-train or every run already finished, takes seconds)
        "runs_wall_s": round(sum(runs.results[j.run_dir]["wall_s"] for j in runs.jobs if j.run_dir in runs.results), 1),
        "wall_s_this_invocation": round(time.time() - t0, 1),
        "runs": len(runs.jobs), "finished": sum(j.run_dir in runs.results for j in runs.jobs),
    }
    atomic_write_json(Path(cfg.out) / "ablation.json", out)
    if runs.failures:
        raise JobsFailed(runs.failures, f"{Path(cfg.out) / 'ablation.json'} holds the runs that finished", partial=out)
    return out


def pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" +- {std:.4f}" if std is not None else "")


def _p(rec: dict, split: str = "") -> float | None:
    """A row's one-sided Welch p on test (`split` "") or val ("_val"): that a swap lowers the loss,
    or that leaving a technique out raises it."""
    return rec.get(("p_better" if rec.get("swap") else "p_hurts") + split)


def _eff(rec: dict) -> str:
    eff = rec.get("efficiency")
    return "-" if eff is None else f"{eff:.2f}x" + ("~" if rec.get("efficiency_extrapolated") else "")


def describe(ab: dict) -> str:
    """The ablation as a table: one line per technique, the full recipe first."""
    recs = [ab["full"]] + ab["variants"]
    w = max(15, *(len(r["technique"]) for r in recs))
    lines = [f"{'technique':<{w}} {'test loss without':>19} {'delta':>8} {'p':>8} {'val loss':>19} {'p val':>8} {'eff':>7} "
             f"{'wall':>7}  off / swap"]
    for rec in recs:
        delta = rec.get("delta_test")
        p, p_val = _p(rec), _p(rec, "_val")
        wall = rec.get("wall_s")
        lines.append(f"{rec['technique']:<{w}} {pm(rec['test_mean'], rec['test_std']):>19} "
                     f"{(f'{delta:+.4f}' if delta is not None else '-'):>8} {(f'{p:.3f}' if p is not None else '-'):>8} "
                     f"{pm(rec['val_mean'], rec['val_std']):>19} {(f'{p_val:.3f}' if p_val is not None else '-'):>8} {_eff(rec):>7} "
                     f"{(f'{wall:.0f}s' if wall is not None else '-'):>7}  "
                     + (", ".join(f"{k}={v}" for k, v in rec["off"].items()) or "-")
                     + (f" [{len(rec['errors'])} failed: {rec['errors'][0]}]" if rec.get("errors") else ""))
    if ab.get("finished", ab.get("runs")) != ab.get("runs"):
        lines.append(f"partial: {ab['finished']} of {ab['runs']} runs finished; means over the seeds that finished")
    lines.append(f"delta = mean test loss without the technique (or with the swap) - the full recipe's (> 0: the "
                 f"technique helps, the swap hurts); p = one-sided Welch p that removing a technique raises the test "
                 f"loss, or that a swap lowers it (p val: the same on the val losses); {ab['seeds']} seed(s) each"
                 + ("; swaps at the full recipe's wall time (run length scaled by measured step times)"
                    if ab.get("equal_time") else "")
                 + (f"; eff = data efficiency on {ab['curve']} (~: extrapolated on its power-law fit)" if ab.get("curve") else ""))
    return "\n".join(lines)
