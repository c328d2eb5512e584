"""Command-line layer of the training-side commands: train, eval, sample, ensemble, sweep,
efficiency, record, report, bench, plan. Each parses its flags and calls an importable function.

A module that imports torch (~3 s) is imported inside the command that runs it, marked
`# imports torch`: the command line is built, and every usage error answered, without it
(tests/test_cli.py). The rest is imported here.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

from .config import ConfigError, build_config, describe_options, parse_overrides, parse_value, recipe_names
from .dataset import Dataset, require_comparable
from .efficiency import Curve, EfficiencyError, check_same_data, place, run_loss
from .prepare import default_dataset
from .records import ALPHA, make_record
from .records import check as check_record
from .results import ResultError, chosen, member_weights, read_result, variant_weights
from .rundir import MEMBER_SNAPSHOTS, RESULT, VARIANT_FILES, RunDir
from .storage import atomic_write_json
from .track import TRACK, TRACK_PARTS, TrackError, plan_curve, run_track

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    passthrough: bool = False  # accepts --section.key=value config overrides


_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9}


def count(text: str) -> int:
    """A token count: 262144, 262_144, 256k, 1.001k, 10M or 1.5B (decimal suffixes, exact)."""
    t = text.strip().replace("_", "").lower()
    mult = _SUFFIXES.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _SUFFIXES else t
    try:
        value = Decimal(digits) * mult  # exact: 1.001k is 1001, where a float gives 1000.9999...
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 262144, 256k, 10M, 1.5B)") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"not a non-negative token count: {text!r}")
    if value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is {value.normalize():f} tokens, not a whole number")
    return int(value)


def _run_dir(path: str) -> str:
    """An ensemble's --run-dir that names an existing file is refused here, in one line
    (`train` refuses its own)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"--run-dir {path}: exists and is not a directory")
    return path


def _run_dir_default(recipe: str) -> str:
    name = Path(recipe).stem if recipe.endswith(".toml") else recipe
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def config_args(p: argparse.ArgumentParser, recipe_default: str = "slowrun") -> None:
    """--recipe / --data plus the dotted --section.key=value overrides."""
    p.add_argument("--recipe", default=recipe_default, help=f"recipe name (shipped: see --help-config) or path to a TOML file (default {recipe_default})")
    p.add_argument("--data", default=None, help="prepared dataset directory (default: the builtin dataset in data/builtin, prepared if absent)")
    p.add_argument("--help-config", action="store_true", help="list every config key (--section.key=value) with its default and help")


def build_run_config(a: argparse.Namespace):
    overrides = parse_overrides(getattr(a, "overrides", []) or [])
    if a.data:
        overrides["data.path"] = a.data
    return build_config(a.recipe, overrides)


def _print_config_help() -> int:
    print(f"recipes: {', '.join(recipe_names())}\n")
    print(describe_options())
    return 0


# ---------------------------------------------------------------------------------------
# train


def _add_train(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--run-dir", default=None, help="run directory (default runs/RECIPE-TIMESTAMP)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run exactly from its last good checkpoint")
    p.add_argument("--quiet", action="store_true", help="no per-step lines on stdout (log.txt still gets them); the final table is still printed")
    p.add_argument("--force", action="store_true", help="with --resume: continue although config.toml differs from the checkpoint's config")


def _run_train(a: argparse.Namespace) -> int:
    if a.help_config:
        return _print_config_help()
    from .train import train  # imports torch

    if a.resume:
        if getattr(a, "overrides", None):
            raise ConfigError("--resume takes the run's own config.toml; config overrides are not allowed")
        result = train(None, a.resume, resume=True, echo=not a.quiet, force=a.force)
    else:
        result = train(build_run_config(a), a.run_dir or _run_dir_default(a.recipe), echo=not a.quiet)
    if a.quiet and result:  # quiet hides the per-step lines, never the answer
        from .final_eval import result_table  # imports torch

        print(result_table(result))
    return 0


# ---------------------------------------------------------------------------------------
# eval / sample


def _open_dataset(weights_extra: dict, cfg, data: str | None, ref: str):
    """The dataset to score on (default: the one the model was trained on), refusing one whose
    tokenizer or val/test differ from those the weights were trained with."""
    ds = Dataset.open(data or cfg.data.path, verify=True)
    trained_on = weights_extra.get("dataset", {})
    if trained_on:
        require_comparable(trained_on, ds.fingerprint, f"{ref} and the dataset {ds.path}")
    return ds


def _max_tokens(text: str) -> int:
    return -1 if text.strip() == "-1" else count(text)


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", metavar="RUN_DIR|CHECKPOINT", help="a finished run directory (the variant it chose on val), a checkpoint directory, or a .safetensors file")
    p.add_argument("--variant", default=None, help=f"a finished run's variant: {', '.join([*VARIANT_FILES, *MEMBER_SNAPSHOTS])} "
                   "(the *_probs ones average the probabilities of the swa/cycle_* or epochs/epoch_* snapshots); default: result.json's best")
    p.add_argument("--split", choices=("val", "test"), default="val", help="held-out split (default val)")
    p.add_argument("--data", default=None, help="dataset directory (default: the one the model was trained on)")
    p.add_argument("--max-tokens", type=_max_tokens, default=-1,
                   help="evaluate only the first N tokens (> 0; suffixes k, M, B); -1 = the whole split (default)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (default), cpu or cuda")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="evaluation precision (default: the run's train.dtype)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _eval_target(ref: str, variant: str | None) -> tuple[list[Path], object, str]:
    """(weights files, their probability weights or None for equal, what is scored): a finished
    run's variant (default: its best on val), or the single weights of a checkpoint, a weights
    file or a run still in progress."""
    from .checkpoint import weights_path  # imports torch

    run = Path(ref)
    if run.is_dir() and RunDir(run).finished():
        name, _ = chosen(read_result(run), variant)
        paths = variant_weights(run, name)
        return paths, member_weights(name, len(paths)), f"variant {name}" + ("" if variant else " (the run's best on val)")
    if variant:
        raise ResultError(f"--variant {variant}: {ref} is not a finished run directory (no {RESULT})")
    path = weights_path(ref)
    return [path], None, str(path)


def _run_eval(a: argparse.Namespace) -> int:
    from .checkpoint import load_model  # imports torch
    from .distributed import resolve_device  # imports torch
    from .evaluate import evaluate_averaged, split_tokens  # imports torch

    if a.max_tokens != -1 and a.max_tokens <= 0:
        raise ConfigError(f"--max-tokens: must be -1 (the whole split) or > 0, got {a.max_tokens}")
    paths, weights, scored = _eval_target(a.ref, a.variant)
    dev = resolve_device(a.device)
    model, cfg, extra = load_model(paths[0], dev)
    ds = _open_dataset(extra, cfg, a.data, a.ref)
    T = cfg.model.seq_len
    if ds.num_tokens(a.split) < T + 1:
        raise ConfigError(f"--split {a.split}: the dataset {ds.path} holds {ds.num_tokens(a.split):,} {a.split} tokens, "
                          f"fewer than one chunk of {T + 1}")
    dtype = a.dtype or cfg.train.dtype

    def models():
        yield model
        for p in paths[1:]:
            yield load_model(p, dev)[0]

    r = evaluate_averaged(models(), split_tokens(ds, a.split, T, cfg.eval.reference_batch), T, ds.token_bytes, cfg.eval.batch_seqs, dev, dtype, a.max_tokens,
                          weights=weights)
    if a.json:
        print(json.dumps({"ref": a.ref, "scored": scored, "weights": [str(p) for p in paths], "split": a.split, "dtype": dtype,
                          "loss": r.loss, "bpb": r.bpb, "targets": r.targets}))
    else:
        print(f"{a.split} loss {r.loss:.4f} | {a.split} bpb {r.bpb:.4f} | {r.targets:,} targets | {dtype} | {a.ref}: {scored}")
    return 0


def _add_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", metavar="RUN_DIR|CHECKPOINT", help="a run directory, checkpoint directory or .safetensors file")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all (default 50)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--data", default=None, help="dataset whose tokenizer to use (default: the model's)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (default), cpu or cuda")


def _check_sampling(a: argparse.Namespace) -> None:
    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {a.max_new_tokens}")
    if not math.isfinite(a.temperature) or a.temperature < 0:
        raise ConfigError(f"--temperature: must be a finite number >= 0 (0 = greedy), got {a.temperature}")
    if a.top_k < 0:
        raise ConfigError(f"--top-k: must be >= 0 (0 = every token), got {a.top_k}")
    if a.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {a.num_samples}")


def _run_sample(a: argparse.Namespace) -> int:
    _check_sampling(a)  # before the model is loaded
    import torch  # only when sampling (see the module docstring)

    from .checkpoint import load_model  # imports torch
    from .distributed import resolve_device  # imports torch
    from .sample import stream, text_pieces  # imports torch

    dev = resolve_device(a.device)
    model, cfg, extra = load_model(a.ref, dev)
    ds = _open_dataset(extra, cfg, a.data, a.ref)
    tok = ds.tokenizer
    ids = [tok.bos_id] + (tok.encode(a.prompt) if a.prompt else [])
    g = torch.Generator().manual_seed(a.seed)
    for i in range(a.num_samples):
        if a.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(a.prompt, end="", flush=True)  # then the text as it is sampled (Ctrl-C keeps what was shown)
        tokens = stream(model, ids, a.max_new_tokens, cfg.model.seq_len, a.temperature, a.top_k, g, dev)
        for piece in text_pieces(tokens, tok.decode):
            print(piece, end="", flush=True)
        print()
    return 0


# ---------------------------------------------------------------------------------------
# sweep / efficiency


def _grid_arg(text: str) -> tuple[str, list]:
    key, sep, values = text.partition("=")
    if not sep or "." not in key or not values:
        raise ConfigError(f"--grid {text}: expected section.key=v1,v2,...")
    return key, [parse_value(v) for v in values.split(",")]


def _budget_multiple(text: str) -> float:
    """A budget multiple (--budgets): a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of the dataset's training tokens")
    return value


def _add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="baseline", help="recipe to sweep (default baseline)")
    p.add_argument("--data", required=True, help="the 1x dataset; larger budgets are prepared from its manifest (same source, val, test, tokenizer)")
    p.add_argument("--out", required=True, help="sweep directory (datasets, runs, curve.json); rerunning continues it")
    p.add_argument("--budgets", nargs="+", type=_budget_multiple, default=[1.0], help="multiples of the dataset's training tokens (e.g. 1 2 4 8 16)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis, e.g. --grid optim.lr=3e-4,6e-4,1.2e-3 (repeatable)")
    p.add_argument("--budget-grid", action="append", default=[], metavar="B:KEY=V1,V2",
                   help="replace a grid axis at budget B only, e.g. --budget-grid 16:optim.lr=3e-4,6e-4,1.2e-3 (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every point (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time on CPU, each its own process (default 1); "
                   "with CUDA, runs sharing each device (or one run per --gpus-per-job devices)")
    p.add_argument("--gpus-per-job", type=int, default=1, metavar="K",
                   help="CUDA devices per run, launched with torchrun when K > 1 (default 1)")
    p.add_argument("--threads", type=int, default=-1, help="torch threads per run (default: torch's choice)")
    p.add_argument("--fit-params", action="store_true", help="fit L(N) = A/N^alpha + E over model sizes and report E")
    p.add_argument("--name", default="", help="curve name (default RECIPE-sweep)")
    p.add_argument("--ledger", default="", metavar="FILE",
                   help="JSON Lines file of finished runs: runs found there are not trained again (on any machine), "
                        "each finished run is appended as it ends")
    p.add_argument("--expand", default="", metavar="KEY",
                   help="an integer grid axis (e.g. model.depth) extended while a budget's best point is at its edge")
    p.add_argument("--refine", action="append", default=[], metavar="B:KEY=F1,F2",
                   help="at budget B also run the chosen point with KEY times each factor, e.g. 16:optim.lr_scale=0.5,2")
    p.add_argument("--seeds", type=int, default=1, help="seeds of each budget's chosen point; the curve uses their mean (default 1)")
    p.add_argument("--plan", action="store_true",
                   help="train nothing: print each budget's next runs (from the run directories and the ledger), "
                        "with their sizes and estimated CPU hours")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: write curve.json from the runs finished so far, with the budgets whose every "
                        "phase is finished (the others listed as pending)")
    p.add_argument("--no-progress", action="store_true")


def _budget_axis(flag: str, item: str) -> tuple[float, str, list]:
    b, _, axis = item.partition(":")
    try:
        key, values = _grid_arg(axis)
        return float(b), key, values
    except ValueError:
        raise ConfigError(f"{flag} {item}: expected B:section.key=v1,v2") from None


def _run_sweep(a: argparse.Namespace) -> int:
    from .jobs import JobsFailed  # imports torch
    from .sweep import SweepConfig, describe, describe_plan, plan, sweep  # imports torch

    grid = dict(_grid_arg(g) for g in a.grid)
    by_budget: dict[float, dict] = {}
    for item in a.budget_grid:
        b, key, values = _budget_axis("--budget-grid", item)
        by_budget.setdefault(b, {})[key] = values
    refine: dict[float, dict] = {}
    for item in a.refine:
        b, key, values = _budget_axis("--refine", item)
        refine.setdefault(b, {})[key] = [float(v) for v in values]
    fixed = {}
    for item in a.set:
        key, _, value = item.partition("=")
        fixed[key] = parse_value(value)
    if a.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {a.seeds}")
    cfg = SweepConfig(a.recipe, a.data, a.out, a.budgets, grid, fixed, by_budget, a.jobs, a.threads, a.fit_params,
                      a.name, not a.no_progress, a.ledger, a.expand, refine=refine, seeds=a.seeds, gpus_per_job=a.gpus_per_job)
    if a.plan:
        print(describe_plan(*plan(cfg)))
        return 0
    try:
        curve = sweep(cfg, train=not a.no_train)
    except JobsFailed as e:  # the curve of the other budgets first, then the error
        if e.partial is not None:
            print(describe(e.partial))
            print(f"wrote {Path(a.out) / 'curve.json'}")
        raise
    print(describe(curve))
    print(f"wrote {Path(a.out) / 'curve.json'}")
    return 0


def _add_efficiency(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve", default="fineweb", help="fineweb (the reference benchmark's published curve) or a curve.json / sweep directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--loss", type=float, help="a loss to place on the curve")
    src.add_argument("--run", help="a run or ensemble directory (its result.json)")
    p.add_argument("--metric", choices=("val", "test"), default=None, help="which loss (default: test if the curve has it, else val)")
    p.add_argument("--variant", default=None, help="a run's variant (final, ema, swa_params, ...; default: its best on val)")
    p.add_argument("--budget", type=int, default=None, help="the budget the efficiency is relative to (default: the curve's)")
    p.add_argument("--extrapolate", action="store_true", help="outside the curve, use a fitted power law L(D) = A/D^alpha + E")
    p.add_argument("--json", action="store_true")


def _run_efficiency(a: argparse.Namespace) -> int:
    if a.loss is not None and not math.isfinite(a.loss):
        raise EfficiencyError(f"--loss {a.loss}: not a finite number")
    if a.budget is not None and a.budget <= 0:
        raise EfficiencyError(f"--budget: must be > 0 tokens, got {a.budget}")
    curve = Curve.load(a.curve)
    metric = curve.metric(a.metric)
    if a.run:
        loss, dataset, _ = run_loss(a.run, metric, a.variant)
        check_same_data(curve, dataset)
    else:
        loss = a.loss
    pl = place(curve, loss, metric, a.extrapolate, a.budget)
    if a.json:
        out = {"efficiency": pl.efficiency, "tokens": pl.tokens, "loss": pl.loss, "metric": pl.metric,
               "extrapolated": pl.extrapolated, "curve": curve.name}
        if pl.fit:
            out["fit"] = pl.fit.as_dict()
        print(json.dumps(out))
    else:
        print(pl.describe())
    return 0


def _add_ablate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="slowrun", help="recipe whose techniques are ablated (default slowrun)")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 of the full recipe and of every variant (default 3)")
    p.add_argument("--only", default="", metavar="A,B", help="ablate only these techniques (default: every one the recipe turns on; "
                   "none: only the --variant swaps)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a swap measured beside the ablations, e.g. soap:optim.matrix_optimizer=soap (repeatable); "
                        "its p is that it lowers the test loss; recipe=OTHER trains another recipe (e.g. "
                        "ref:recipe=limited_cpu), of its own length even with --equal-time")
    p.add_argument("--equal-time", action="store_true",
                   help="swaps train for the full recipe's wall time: their epochs scaled by measured step times")
    p.add_argument("--no-train", action="store_true",
                   help="write the table of the runs finished so far (from --ledger or the run directories); train nothing")
    p.add_argument("--equal-time-file", default="", metavar="FILE",
                   help="where --equal-time keeps the step times (default OUT/equal_time.json); commit it so every machine plans the same runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override of every run, the full recipe's too (repeatable)")
    p.add_argument("--out", default=None, help="ablation directory (runs, ablation.json); rerunning continues it (default runs/ablate-RECIPE)")
    p.add_argument("--curve", default="", help="a baseline curve (curve.json or fineweb) to place every variant on")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each its own process (default 1; with CUDA, per device)")
    p.add_argument("--threads", type=int, default=-1, help="torch threads per run (default: torch's choice)")
    p.add_argument("--ledger", default="", metavar="FILE", help="JSON Lines file of finished runs (as sweep's --ledger)")
    p.add_argument("--no-progress", action="store_true")


def _run_ablate(a: argparse.Namespace) -> int:
    from .ablate import AblateConfig, ablate, describe, parse_variant  # imports torch
    from .jobs import JobsFailed  # imports torch

    fixed = {}
    for item in a.set:
        key, _, value = item.partition("=")
        fixed[key] = parse_value(value)
    out = a.out or f"runs/ablate-{Path(a.recipe).stem}"
    only = [n.strip() for n in a.only.split(",") if n.strip()]
    variants = dict(parse_variant(v) for v in a.variant)
    try:
        ab = ablate(AblateConfig(a.recipe, a.data, out, a.seeds, only, fixed, a.jobs, a.threads, a.ledger, a.curve,
                                 not a.no_progress, variants, a.equal_time, a.equal_time_file, not a.no_train))
    except JobsFailed as e:  # the table of the runs that finished first, then the error
        if e.partial is not None:
            print(describe(e.partial))
            print(f"wrote {Path(out) / 'ablation.json'}")
        raise
    print(describe(ab))
    print(f"wrote {Path(out) / 'ablation.json'}")
    return 0


# ---------------------------------------------------------------------------------------
# ensemble


def _add_ensemble(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--members", type=int, default=4, help="ensemble size K (default 4); member k uses seed train.seed + k")
    p.add_argument("--run-dir", default=None, help="ensemble directory: member_0 ... member_{K-1} and result.json")
    p.add_argument("--distill", nargs="?", const="chain", default="", choices=("chain", "ensemble"),
                   help="chain (the default with --distill alone): member k learns from member k-1; ensemble: "
                        "the last member learns from all the others, trained first as a plain ensemble")
    p.add_argument("--alpha", type=float, default=None, help="distillation weight a in (1-a)*CE + a*T^2*KL (default: the recipe's distill.alpha)")
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature T (default: the recipe's distill.temperature)")
    p.add_argument("--jobs", type=int, default=1, help="members trained at a time (not a chain's) on CPU (default 1); "
                   "with CUDA, members sharing each device (or one member per --gpus-per-job devices)")
    p.add_argument("--gpus-per-job", type=int, default=1, metavar="K",
                   help="CUDA devices per member, launched with torchrun when K > 1 (default 1)")
    p.add_argument("--threads", type=int, default=-1, help="torch threads per member (default: torch's choice)")
    p.add_argument("--student-threads", type=int, default=None,
                   help="torch threads of a distilled member, trained alone (default: --threads)")
    p.add_argument("--fitness-tokens", type=int, default=0, help="carve this many tokens from the end of the training split for member selection (never trained on)")
    p.add_argument("--select", type=int, default=0, help="keep the K' members with the largest fitted mixture weights (default: all)")
    p.add_argument("--eval", nargs="+", default=None, metavar="REF", help="only evaluate these runs/checkpoints/weight files as an ensemble")
    p.add_argument("--out", default=None, help="with --eval: write the JSON result here")
    p.add_argument("--no-progress", action="store_true")


def _run_ensemble(a: argparse.Namespace) -> int:
    if a.help_config:
        return _print_config_help()
    from .ensemble import describe, evaluate_ensemble, train_ensemble  # imports torch

    if a.eval:
        result = evaluate_ensemble(a.eval, a.data, fitness_tokens=a.fitness_tokens, select=a.select)
        print(describe(result))
        if a.out:
            atomic_write_json(a.out, result)
            print(f"wrote {a.out}")
        return 0
    data = a.data or str(default_dataset())
    run_dir = _run_dir(a.run_dir or _run_dir_default(a.recipe) + f"-ens{a.members}")
    result = train_ensemble(a.recipe, data, a.members, run_dir, parse_overrides(getattr(a, "overrides", []) or []),
                            a.distill, a.alpha, a.temperature, a.jobs, a.threads, a.fitness_tokens, a.select,
                            not a.no_progress, gpus_per_job=a.gpus_per_job, student_threads=a.student_threads)
    print(describe(result))
    print(f"wrote {RunDir(run_dir).result}")
    return 0


# ---------------------------------------------------------------------------------------
# record / report


def _add_record(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="runs (or ensembles) of one recipe with distinct seeds; at least 3")
    p.add_argument("--track", default="cpu", help="track name (default cpu)")
    p.add_argument("--name", default=None, help="record name (default: the recipe name)")
    p.add_argument("--records", default="records", help="records directory (default records/)")
    p.add_argument("--curve", default=None, help="baseline curve for the data efficiency (curve.json)")
    p.add_argument("--notes", default="", help="free text kept with the record")
    p.add_argument("--check", action="store_true", help="only say whether the runs beat the track's record at p < 0.05 on val (test shown beside it)")
    p.add_argument("--force", action="store_true", help="replace a record file of the same date and name")


def _run_record(a: argparse.Namespace) -> int:
    if a.check:
        c = check_record(a.runs, a.track, a.records)
        if c["record"] is None:
            print(f"{c['note']}: the candidate (mean val loss {c['candidate_mean']:.4f}, test {c['candidate_test_mean']:.4f}) "
                  "would be the first record")
        else:
            verdict = "beats" if c["beats"] else "does not beat"
            print(f"on val: candidate mean loss {c['candidate_mean']:.4f} {verdict} record {c['record']} ({c['record_mean']:.4f}): "
                  f"one-sided Welch p = {c['p_value']:.4f} (threshold {ALPHA}); "
                  f"test beside it: {c['candidate_test_mean']:.4f} vs {c['record_test_mean']:.4f}")
        return 0
    name = a.name or Path(a.runs[0]).resolve().name
    rec, path = make_record(a.runs, a.track, name, a.records, a.curve, a.notes, a.force)
    tl = rec["test_loss"]
    print(f"record {rec['name']} ({a.track}): test loss {tl['mean']:.4f} +- {tl['std']:.4f} over seeds {rec['seeds']}")
    if rec.get("efficiency", {}).get("value"):
        print(f"data efficiency {rec['efficiency']['value']:.2f}x")
    if rec["vs_best"]:
        v = rec["vs_best"]
        print(f"vs {v['record']}: one-sided Welch p = {v['p_value']:.4f} ({'beats' if v['beats'] else 'does not beat'} it at p < 0.05)")
    print(f"wrote {path}")
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="finished runs and/or ensembles")
    p.add_argument("--out", required=True, help="output directory (index.html and PNGs)")
    p.add_argument("--ablation", default=None, metavar="FILE", help="an ablation.json of `slowrun ablate` (or its directory): a bar chart of the deltas")
    p.add_argument("--curve", default=None, help="a baseline curve (curve.json, or fineweb) to place the runs on")
    p.add_argument("--track-results", default=None, metavar="FILE",
                   help="a CPU track results file (benchmarks/results/cpu_track.json): its curves and entries")
    p.add_argument("--records", default=None, help="records directory, for the records table")
    p.add_argument("--track", default="cpu", help="records track (default cpu)")
    p.add_argument("--title", default="slowrun report")


def _run_report(a: argparse.Namespace) -> int:
    from .report import ReportError, build_report  # imports torch

    if not a.runs and not a.ablation and not a.track_results:
        raise ReportError("give run directories, --ablation FILE, --track-results FILE, or several")
    page = build_report(a.runs, a.out, a.curve, a.records, a.track if a.records else None, a.title, a.ablation,
                        a.track_results)
    print(f"wrote {page}")
    return 0


# ---------------------------------------------------------------------------------------
# plan


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="recipe name or path to a TOML file")
    p.add_argument("--gpus", type=int, default=1, help="ranks the global batch is split over (default 1)")
    p.add_argument("--micro-batch-tokens", type=count, default=-1, metavar="T",
                   help="tokens per forward/backward on one rank (default: the recipe's train.micro_batch_tokens)")
    p.add_argument("--train-tokens", type=count, default=-1, metavar="N",
                   help="training tokens the epochs are counted in (default: --data's, else the benchmark's 100M)")
    p.add_argument("--data", default=None, help="a prepared dataset: its training tokens and vocabulary")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, e.g. model.n_layer=30 (repeatable)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where it would train (default cuda): the output layer differs")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--step-s", type=float, default=None, metavar="S", help="a measured step time in seconds: project the run's wall time")
    src.add_argument("--run", default=None, metavar="RUN_DIR", help="take the step time from a run's metrics.jsonl (median step_s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _run_plan(a: argparse.Namespace) -> int:
    from .plan import as_json, describe, median_step_s, plan  # imports torch

    over = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected section.key=value")
        over[key] = parse_value(value)
    step_s = median_step_s(a.run) if a.run else a.step_s
    p = plan(a.recipe, over, a.gpus, a.micro_batch_tokens, a.train_tokens, a.data, a.device, step_s)
    print(as_json(p) if a.json else describe(p))
    return 0


# ---------------------------------------------------------------------------------------
# bench


def _add_throughput_args(ap: argparse.ArgumentParser) -> None:
    """`slowrun bench throughput` (`speed.run`); defined here, as speed.py imports torch, which would
    cost every command's start a second."""
    ap.add_argument("--recipes", nargs="+", default=["minimal", "baseline", "slowrun"],
                    help="recipes to time; 'minimal' is the plain nanoGPT-style loop at the baseline's size")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--data", default="data/builtin", help="prepared dataset (default: the builtin one, prepared if absent)")
    ap.add_argument("--out", default="benchmarks/results/throughput.json", help="JSON output")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every recipe (repeatable)")


def _add_bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="{cpu-track,throughput}")
    track = sub.add_parser("cpu-track", help="the CPU track: baseline curve, single and ensemble entries, speed, memory")
    track.add_argument("--work", default="benchmarks/work/cpu-track", help="runs and datasets (cached; rerunning continues)")
    track.add_argument("--out", default="benchmarks/results/cpu_track.json", help="results JSON")
    track.add_argument("--report", default="benchmarks/results/cpu_track", help="report directory (index.html + PNGs)")
    track.add_argument("--parts", nargs="+", default=None, choices=list(TRACK_PARTS) + ["curve"],
                       help="what to (re)compute (default: all; curve = baseline); entries not recomputed are placed "
                            "again on the current curves from their stored losses")
    track.add_argument("--budgets", nargs="+", type=_budget_multiple, default=None,
                       help="measure only these budgets of the baseline curve (into the ledger), e.g. --budgets 8; "
                            "nothing else is computed or written")
    track.add_argument("--jobs", type=int, default=2, help="runs at a time for the curve and independent members (default 2; "
                       "with CUDA, per device)")
    track.add_argument("--threads", type=int, default=1, help="torch threads per run when --jobs > 1 (default 1)")
    track.add_argument("--plan", action="store_true",
                       help="train nothing: print the baseline curve's next runs per budget (all, or --budgets), with "
                            "their sizes and estimated CPU hours from the ledger's runs")
    track.add_argument("--no-train", action="store_true",
                       help="train nothing: the curve from the ledger's finished budgets (the others listed as pending), "
                            "the stored entries placed on it (implies --parts baseline)")
    _add_throughput_args(sub.add_parser("throughput", help="tokens/s, MFU and peak RSS of recipes vs a minimal loop, fp32 and bf16"))


def _run_bench(a: argparse.Namespace) -> int:
    if a.bench == "throughput":
        from .speed import run  # imports torch

        run(a)
        return 0
    parts = a.parts or (["baseline"] if a.no_train else list(TRACK_PARTS))
    if a.no_train and set(parts) - {"baseline", "curve"}:
        raise TrackError(f"--no-train trains nothing: --parts {' '.join(parts)} would train entries or measure speed; "
                         "use --parts baseline (the entries are placed from their stored losses)")
    if a.plan:
        print(plan_curve(TRACK, a.work, a.out, a.jobs, a.threads, a.budgets))
        return 0
    run_track(TRACK, a.work, a.out, a.report, tuple(parts), a.jobs, a.threads, a.budgets, train_curve=not a.no_train)
    return 0


def table():
    """This module's rows of the CLI's command table."""
    return [
        Command("train", "train a model from a recipe (no arguments: the slowrun recipe on the builtin data)", _add_train, _run_train, passthrough=True),
        Command("eval", "held-out loss and bits-per-byte of a run or checkpoint", _add_eval, _run_eval),
        Command("sample", "generate text from a run or checkpoint", _add_sample, _run_sample),
        Command("ensemble", "train K members (optionally chain-distilled) and evaluate them together; or --eval any runs", _add_ensemble, _run_ensemble, passthrough=True),
        Command("sweep", "a recipe over a config grid at nested budgets: a tuned baseline curve (curve.json)", _add_sweep, _run_sweep),
        Command("ablate", "leave-one-out ablation of every technique a recipe turns on, over seeds (ablation.json)", _add_ablate, _run_ablate),
        Command("record", "make a record (>= 3 seeds, Welch t-test vs the track's best) or --check a candidate", _add_record, _run_record),
        Command("report", "a static HTML report with plots of runs, ensembles, curves and records", _add_report, _run_report),
        Command("bench", "benchmarks: the CPU track, and training throughput", _add_bench, _run_bench),
        Command("efficiency", "data efficiency of a loss or run on a baseline curve (e.g. 6.12x)", _add_efficiency, _run_efficiency),
        Command("plan", "parameters, FLOPs, steps, memory per rank and projected wall time of a recipe (nothing is trained)", _add_plan, _run_plan),
    ]
