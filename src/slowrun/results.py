"""Reading what a finished run leaves behind: its `result.json`, the losses of the variant it
chose, and the weights each variant is made of (their files are named in `rundir`).

A single run's result.json holds `variants` (name -> val/test loss and bpb) and `best`,
the variant with the lowest val loss. An ensemble's holds `methods` (probs, logits,
params -> losses) and its headline losses are those of probability averaging. Every
command that reads a result (eval, report, record, efficiency, ensemble) goes through
`read_result` (the validating reader of `formats`) and `chosen`, so a corrupt or inconsistent
file is one clear error naming the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import SlowrunError
from .formats import read_checked, result_spec
from .rundir import MEMBER_SNAPSHOTS, RESULT, VARIANT_FILES, RunDir


def member_weights(variant: str, k: int) -> np.ndarray | None:
    """Weights of a probability-averaged variant's k members in file order: equal (None), or
    for a recency-weighted one, member i of k gets i / (1 + ... + k) (the reference's)."""
    if variant.endswith("_recency"):
        w = np.arange(1, k + 1, dtype=np.float64)
        return w / w.sum()
    return None


ENSEMBLE_METHOD = "probs"  # an ensemble's headline losses


class ResultError(SlowrunError):
    pass


def read_result(run: str | Path) -> dict:
    """A run's or ensemble's result.json (given the directory or the file itself)."""
    path = Path(run)
    path = RunDir(path).result if path.is_dir() else path
    if not path.is_file():
        raise ResultError(f"{run}: no {RESULT} (missing or unfinished run)")
    return read_checked(path, result_spec, ResultError)


def is_ensemble(result: dict) -> bool:
    return result.get("kind") == "ensemble"


def chosen(result: dict, variant: str | None = None) -> tuple[str, dict]:
    """(name, losses) of a result's variant: `variant` if given, else the one the run chose on val
    (an ensemble: probability averaging). Losses are {val_loss, val_bpb, test_loss, test_bpb} as present."""
    table = result.get("methods") if is_ensemble(result) else result.get("variants")
    name = variant or (ENSEMBLE_METHOD if is_ensemble(result) else result.get("best"))
    if not isinstance(table, dict) or name not in table:
        have = ", ".join(table) if isinstance(table, dict) else "none"
        what = "--variant" if variant else "its best"
        raise ResultError(f"result names no variant '{name}' ({what}; it has: {have})")
    losses = table[name]
    if not isinstance(losses, dict) or "val_loss" not in losses:
        raise ResultError(f"variant '{name}' has no losses in the result ({losses})")
    bad = {k: v for k, v in losses.items() if k.endswith(("_loss", "_bpb")) and not isinstance(v, (int, float))}
    if bad:
        raise ResultError(f"variant '{name}': losses that are not numbers in the result ({bad})")
    return name, losses


def variant_weights(run_dir: str | Path, variant: str) -> list[Path]:
    """The weights a run's variant is made of: its own file, or (a probability-averaged
    variant) the snapshots whose probabilities the final evaluation averaged."""
    run = RunDir(run_dir)
    if variant in VARIANT_FILES:
        path = run.weights(variant)
        if not path.is_file():
            raise ResultError(f"{run_dir}: variant {variant} has no weights ({path.name} is missing)")
        return [path]
    if variant in MEMBER_SNAPSHOTS:
        snaps = run.snapshots(variant)
        if len(snaps) < 2:
            raise ResultError(f"{run_dir}: variant {variant} needs the snapshots {MEMBER_SNAPSHOTS[variant]}, found {len(snaps)}")
        return snaps
    known = ", ".join([*VARIANT_FILES, *MEMBER_SNAPSHOTS])
    raise ResultError(f"--variant {variant}: unknown (one of {known})")
