"""Command-line layer of the training-side commands: train, eval, sample, ensemble, sweep,
efficiency, record, report, bench. Each parses its flags and calls an importable function."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _run_dir_default(recipe: str) -> str:
    name = Path(recipe).stem if recipe.endswith(".toml") else recipe
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def config_args(p: argparse.ArgumentParser, recipe_default: str = "slowrun") -> None:
    """--recipe / --data plus the dotted --section.key=value overrides."""
    p.add_argument("--recipe", default=recipe_default, help=f"recipe name (shipped: see --help-config) or path to a TOML file (default {recipe_default})")
    p.add_argument("--data", default=None, help="prepared dataset directory (default: the builtin dataset in data/builtin, prepared if absent)")
    p.add_argument("--help-config", action="store_true", help="list every config key (--section.key=value) with its default and help")


def build_run_config(a: argparse.Namespace):
    from .config import build_config, parse_overrides

    overrides = parse_overrides(getattr(a, "overrides", []) or [])
    if a.data:
        overrides["data.path"] = a.data
    return build_config(a.recipe, overrides)


def _print_config_help() -> int:
    from .config import describe_options, recipe_names

    print(f"recipes: {', '.join(recipe_names())}\n")
    print(describe_options())
    return 0


# ---------------------------------------------------------------------------------------
# train


def _add_train(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--run-dir", default=None, help="run directory (default runs/RECIPE-TIMESTAMP)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run exactly from its last good checkpoint")
    p.add_argument("--quiet", action="store_true", help="no per-step lines on stdout (log.txt still gets them)")


def _run_train(a: argparse.Namespace) -> int:
    if a.help_config:
        return _print_config_help()
    from .train import train

    if a.resume:
        if getattr(a, "overrides", None):
            from .config import ConfigError

            raise ConfigError("--resume takes the run's own config.toml; config overrides are not allowed")
        train(None, a.resume, resume=True, echo=not a.quiet)
        return 0
    cfg = build_run_config(a)
    train(cfg, a.run_dir or _run_dir_default(a.recipe), echo=not a.quiet)
    return 0


def table():
    """This module's rows of the CLI's command table."""
    from .cli import Command

    return [
        Command("train", "train a model from a recipe (no arguments: the slowrun recipe on the builtin data)", _add_train, _run_train, passthrough=True),
    ]
