"""The run directory: the name of every file a run (and an ensemble) keeps there, in one place.

`slowrun train --run-dir RUN` writes

    config.toml                   the resolved config, before the first step (`--resume` reads it)
    log.txt                       the header, a line per logged step, the final table
    metrics.jsonl                 one JSON object per logged step and evaluation
    checkpoints/step_NNNNNNN/     the last train.keep_checkpoints checkpoints (`checkpoint.py`)
    swa/cycle_NNN.safetensors     the weights at each SWA or snapshot cycle end
    epochs/epoch_NNN.safetensors  the weights at the last train.epoch_snapshots epoch ends
    model.safetensors             the final weights; the other variants with weights of their own
                                  beside it (VARIANT_FILES); each weights file has a NAME.sha256
    result.json                   the final evaluation, written last: a run that has it is finished
    .lock                         held while a process trains in it (not a sign of a run)
    tb/                           TensorBoard events (train.tensorboard)

An ensemble directory (`slowrun ensemble --run-dir ENS`) holds member_0 ... member_{K-1}, each
a run directory, and its own result.json.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.toml"
LOG = "log.txt"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
RESULT = "result.json"
LOCK = ".lock"
TENSORBOARD = "tb"
# what a start that stopped before its first checkpoint leaves (a failed start): a new start replaces it
START_FILES = (CONFIG, LOG, METRICS)
# variant -> its weights file (the variants a parameter average or the training itself gives)
VARIANT_FILES = {"final": "model.safetensors", "ema": "ema.safetensors", "swa_params": "swa_avg.safetensors",
                 "snapshot_params": "snapshot_avg.safetensors", "epochs_params_recency": "epochs_avg_recency.safetensors"}
SNAPSHOT_FILE = "swa/cycle_{cycle:03d}.safetensors"  # one per SWA / snapshot cycle end
EPOCH_SNAPSHOT_FILE = "epochs/epoch_{epoch:03d}.safetensors"  # the last train.epoch_snapshots epoch ends
# probability-averaged variants have no weights of their own: their members are these snapshots
MEMBER_SNAPSHOTS = {"swa_probs": "swa/cycle_*.safetensors", "snapshot_probs": "swa/cycle_*.safetensors",
                    "epochs_probs": "epochs/epoch_*.safetensors", "epochs_probs_recency": "epochs/epoch_*.safetensors"}


class _File:
    """A RunDir attribute: the path of one of the run directory's fixed names."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, run: "RunDir | None", owner: type):
        return self if run is None else run.path / self.name


class RunDir:
    """The paths of one run directory (nothing is read or created): `RunDir(d).result`, ..."""

    config = _File(CONFIG)
    log = _File(LOG)
    metrics = _File(METRICS)
    checkpoints = _File(CHECKPOINTS)
    result = _File(RESULT)
    lock = _File(LOCK)
    tensorboard = _File(TENSORBOARD)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def finished(self) -> bool:
        """The run (or ensemble) wrote its result.json."""
        return self.result.is_file()

    def weights(self, variant: str = "final") -> Path:
        """The weights file of a variant that has one of its own (VARIANT_FILES)."""
        return self.path / VARIANT_FILES[variant]

    def snapshot(self, cycle: int) -> Path:
        return self.path / SNAPSHOT_FILE.format(cycle=cycle)

    def epoch_snapshot(self, epoch: int) -> Path:
        return self.path / EPOCH_SNAPSHOT_FILE.format(epoch=epoch)

    def snapshots(self, variant: str) -> list[Path]:
        """The snapshots a probability-averaged variant averages (MEMBER_SNAPSHOTS), oldest first."""
        return sorted(self.path.glob(MEMBER_SNAPSHOTS[variant]))

    def member(self, k: int) -> Path:
        """Member k of an ensemble directory (a run directory)."""
        return self.path / f"member_{k}"
