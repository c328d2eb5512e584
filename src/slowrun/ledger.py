"""The results ledger: finished training runs as JSON Lines, kept in the repository.

A sweep or the CPU track can take days of CPU time over several machines. Every finished
run is appended to the ledger (one JSON object per line) as soon as it ends, so a run
found there is never trained again on any machine. A line holds the run's key (a hash of
its resolved config without what cannot change the result: paths, threads, logging, and
without values at their defaults, so that a config field added later changes no key), the
dataset it trained on (tokenizer, val, test and train hashes), every weights variant's
val/test loss and bits per byte, steps, wall time, device, torch version and commit.

A path a line holds (the config's `data.path`, which the trainer makes absolute, the run
directory, a teacher) is written relative to the working directory when it lies inside it,
so that the committed ledger names no machine's directories; lines written before that
(absolute paths) read as they are, and no path enters a line's key.

A line is appended with one `write` under an exclusive `flock`, so two sweeps writing the
same ledger at once never interleave or lose a line. A line that is not valid JSON, or lacks
a field the readers use (or holds one of the wrong kind), stops the reader with its line
number and the field (`formats.LEDGER_LINE`): the ledger is data others build on, never
guessed at.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from . import SlowrunError
from .config import parse_overrides, section_defaults
from .dataset import Dataset
from .formats import LEDGER_FORMAT as FORMAT, LEDGER_LINE, read_checked_lines
from .results import read_result

# config keys that cannot change a run's losses: paths, parallelism, logging and saving
NON_RESULT_KEYS = {
    "data": ("path",),
    "train": ("num_threads", "progress", "log_every", "wandb", "tensorboard", "checkpoint_every", "keep_checkpoints",
              "save_final", "device", "compile", "compile_scope", "compile_backend", "compile_loss", "dist_timeout_min"),
}
DATASET_KEYS = ("tokenizer", "val", "test", "train", "train_tokens")


class LedgerError(SlowrunError):
    pass


def config_key(config: dict[str, Any]) -> str:
    """The run's identity: sha256 of its resolved config without the keys in NON_RESULT_KEYS
    and without values equal to the field's default in this version of slowrun.

    Leaving defaults out keeps keys stable across versions: a config field added later (with
    a default that keeps the old behaviour) is absent from old results and at its default in
    new ones, and neither changes the key. A default that changes makes old runs' values
    non-default, so their keys differ from new runs', as they should. Fields this version does
    not know are kept, so a run of an unknown setting is never taken for a known one."""
    pruned = {}
    for sec, vals in config.items():
        defaults = section_defaults(sec)
        kept = {k: v for k, v in vals.items()
                if k not in NON_RESULT_KEYS.get(sec, ()) and not (k in defaults and v == defaults[k])}
        if kept:
            pruned[sec] = kept
    return hashlib.sha256(json.dumps(pruned, sort_keys=True).encode()).hexdigest()[:16]


def dataset_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a ledger line's dataset must equal: tokenizer, val, test and train contents."""
    files = manifest["files"]
    return {"tokenizer": manifest["tokenizer"]["fingerprint"], "val": files.get("val.bin"), "test": files.get("test.bin"),
            "train": files.get("train.bin"), "train_tokens": int(manifest["splits"]["train"]["tokens"])}


def portable_paths(value: Any, root: Path) -> Any:
    """`value` (JSON data) with every string that is an absolute path inside `root` made
    relative to it ("." for `root` itself), each of a comma-separated list of absolute paths
    too (distill.teacher's ensemble); other strings, outside paths included, unchanged."""
    if isinstance(value, dict):
        return {k: portable_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v, root) for v in value]
    if isinstance(value, str) and "," in value and all(os.path.isabs(p) for p in value.split(",")):
        return ",".join(portable_paths(p, root) for p in value.split(","))  # several teachers
    if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(root):
        return str(Path(value).relative_to(root))
    return value


def entry_from_result(result: dict[str, Any], tag: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ledger line from a finished run's result.json."""
    env = result.get("environment", {})
    ds = result["dataset"]
    return {
        "format": FORMAT, "key": config_key(result["config"]), "tag": tag or {},
        "dataset": {k: ds.get(k) for k in DATASET_KEYS},
        "variants": result["variants"], "best": result["best"],
        "params": result["params"], "steps": result["steps"], "tokens_seen": result["tokens_seen"],
        "wall_s": result["wall_s"], "train_wall_s": result.get("train_wall_s"), "tokens_per_s": result.get("tokens_per_s"),
        "device": env.get("device"), "torch": env.get("torch"), "commit": env.get("git_commit"),
        "threads": result["config"]["train"].get("num_threads"), "seed": result.get("seed"),
        "run_dir": result.get("run_dir"), "config": result["config"],
    }


@dataclass
class Ledger:
    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> "Ledger":
        """Read every line (a missing file is an empty ledger); a corrupt line is an error naming it
        and its field. A path that is there but is no file (a directory) is refused at once, not
        when the first finished run is appended."""
        path = Path(path)
        led = cls(path)
        if path.exists() and not path.is_file():
            raise LedgerError(f"--ledger {path}: not a file (a ledger is a JSON Lines file, e.g. {path / 'ledger.jsonl'})")
        if not path.is_file():
            return led
        for n, e in read_checked_lines(path, LEDGER_LINE, LedgerError):
            e["_line"] = n
            if isinstance(e.get("config"), dict):  # keyed by this version's config_key, not the stored one
                e["key"] = config_key(e["config"])
            led.entries.append(e)
        return led

    def find(self, key: str, dataset: dict[str, Any], warn=print) -> dict[str, Any] | None:
        """The entry for this config on exactly this dataset. An entry of the same config and
        budget whose tokenizer or val/test/train hashes differ is ignored with one line."""
        for e in self.entries:
            if e["key"] != key:
                continue
            if e["dataset"] == {k: dataset.get(k) for k in DATASET_KEYS}:
                return e
            if e["dataset"].get("train_tokens") == dataset.get("train_tokens"):
                diff = [k for k in DATASET_KEYS if e["dataset"].get(k) != dataset.get(k)]
                warn(f"ledger: ignoring {self.path}:{e['_line']} (same config, but its dataset differs in "
                     f"{', '.join(diff)})")
        return None

    def append(self, entry: dict[str, Any]) -> None:
        """Append one line atomically (O_APPEND, one write, under an exclusive lock); paths inside
        the working directory are written relative to it (`portable_paths`)."""
        entry = portable_paths({k: v for k, v in entry.items() if k != "_line"}, Path.cwd())
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size:  # a previous writer killed mid-line must not glue two lines together
                    with open(self.path, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self.entries.append({**entry, "_line": None})

    def merge(self, other: "Ledger") -> int:
        """Append every entry of `other` that this ledger lacks (the same config on the same
        dataset), in its order; returns how many. For points run on another machine."""
        added = 0
        for e in other.entries:
            if self.find(e["key"], e["dataset"], warn=lambda _: None) is None:
                self.append(e)
                added += 1
        return added


def rerun_line(ledger: Ledger, key: str, data: str, overrides: list[str]) -> dict[str, Any]:
    """The ledger line `slowrun ledger rerun` trains again on this machine (e.g. a CPU point on a
    GPU, to learn how far points from the two devices may be mixed), checked before any training.

    `key` is a line's config key (as this version computes it) or a unique prefix of one, or
    "@N" for the ledger's line N (lines are only ever appended, so N stays the same point while
    keys follow the version); the dataset in `data` must be the line's own (same tokenizer and
    split hashes). `overrides` (--section.key=value) may only set
    what cannot change the losses (NON_RESULT_KEYS: device, threads, logging), so the rerun is
    the line's config exactly (`rerun_recipe`); `compare_rerun` then reads the run."""
    for k, v in parse_overrides(overrides).items():
        sec, _, name = k.partition(".")
        if name not in NON_RESULT_KEYS.get(sec, ()):
            allowed = ", ".join(f"train.{k}" for k in NON_RESULT_KEYS["train"])
            raise LedgerError(f"--{k}={v}: a rerun takes only settings that cannot change the losses ({allowed})")
    if key.startswith("@"):
        hits = [e for e in ledger.entries if str(e["_line"]) == key[1:]]
        if not hits:
            raise LedgerError(f"{ledger.path}: no line {key[1:]} (it has {len(ledger.entries)} entries)")
    else:
        hits = [e for e in ledger.entries if e["key"].startswith(key)]
        if len({e["key"] for e in hits}) != 1:
            raise LedgerError(f"{ledger.path}: {'no' if not hits else 'more than one'} config key starts with {key!r}")
    ds = dataset_identity(Dataset.open(data).manifest)
    entry = next((e for e in hits if e["dataset"] == ds), None)
    if entry is None:
        raise LedgerError(f"{data} is not the dataset of {ledger.path}:{hits[0]['_line']} (tokenizer or split hashes differ)")
    return entry


def rerun_recipe(entry: dict[str, Any], path: Path) -> Path:
    """A ledger line's whole config written as a recipe file at `path`."""
    path.write_text(tomli_w.dumps(entry["config"]), encoding="utf-8")
    return path


def compare_rerun(entry: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Every weights variant's val and test loss of a ledger line beside its rerun's in `run_dir`."""
    here = entry_from_result(read_result(run_dir))
    rows = {v: {f"{split}_loss": {"ledger": entry["variants"][v][f"{split}_loss"], "here": here["variants"][v][f"{split}_loss"],
                                  "diff": here["variants"][v][f"{split}_loss"] - entry["variants"][v][f"{split}_loss"]}
                for split in ("val", "test") if f"{split}_loss" in here["variants"][v]}
            for v in here["variants"] if v in entry["variants"]}
    return {"key": entry["key"], "line": entry["_line"], "tag": entry.get("tag"), "ledger_device": entry["device"],
            "device": here["device"], "ledger_wall_s": entry["wall_s"], "wall_s": here["wall_s"], "variants": rows}


if __name__ == "__main__":  # `python -m slowrun.ledger merge|rerun ...`, the older spelling of `slowrun ledger`: run that
    sys.argv.insert(1, "ledger")
    runpy.run_module("slowrun", run_name="__main__", alter_sys=True)
