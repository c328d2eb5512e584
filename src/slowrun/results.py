"""What a finished run leaves behind: `result.json`, the weight file of each variant, and
the losses of the variant it chose.

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

RESULT_FILE = "result.json"
# variant -> the weights file train.py writes for it in the run directory
VARIANT_FILES = {"final": "model.safetensors", "ema": "ema.safetensors", "swa_params": "swa_avg.safetensors",
                 "snapshot_params": "snapshot_avg.safetensors", "epochs_params_recency": "epochs_avg_recency.safetensors"}
# probability-averaged variants have no weights of their own: their members are these snapshots
SNAPSHOT_FILE = "swa/cycle_{cycle:03d}.safetensors"  # one per SWA / snapshot cycle end
EPOCH_SNAPSHOT_FILE = "epochs/epoch_{epoch:03d}.safetensors"  # the last train.epoch_snapshots epoch ends
MEMBER_SNAPSHOTS = {"swa_probs": "swa/cycle_*.safetensors", "snapshot_probs": "swa/cycle_*.safetensors",
                    "epochs_probs": "epochs/epoch_*.safetensors", "epochs_probs_recency": "epochs/epoch_*.safetensors"}


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
    path = path / RESULT_FILE if path.is_dir() else path
    if not path.is_file():
        raise ResultError(f"{run}: no {RESULT_FILE} (missing or unfinished run)")
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
    run_dir = Path(run_dir)
    if variant in VARIANT_FILES:
        path = run_dir / VARIANT_FILES[variant]
        if not path.is_file():
            raise ResultError(f"{run_dir}: variant {variant} has no weights ({path.name} is missing)")
        return [path]
    if variant in MEMBER_SNAPSHOTS:
        snaps = sorted(run_dir.glob(MEMBER_SNAPSHOTS[variant]))
        if len(snaps) < 2:
            raise ResultError(f"{run_dir}: variant {variant} needs the snapshots {MEMBER_SNAPSHOTS[variant]}, found {len(snaps)}")
        return snaps
    known = ", ".join([*VARIANT_FILES, *MEMBER_SNAPSHOTS])
    raise ResultError(f"--variant {variant}: unknown (one of {known})")
