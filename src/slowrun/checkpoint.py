"""Checkpoints: safetensors for tensors, JSON for everything else; never unpickled.

A training checkpoint is a directory `checkpoints/step_0000123/` holding

    model.safetensors   the weights (the resolved config in the file's metadata), and its
                        sidecar model.safetensors.sha256
    optim.safetensors   optimizer moments and EMA weights
    state.json          step, loader position, scalar optimizer state, the config, extras,
                        the sha256 of both tensor files, and a sha256 of its own content

It is written under a temporary name and renamed, and the last `keep` are kept. Loading
checks every hash, so a truncated, garbled or edited checkpoint is refused with a clear
error and resume falls back to the previous good one.

Every weights file (a checkpoint's, `model.safetensors`, `ema.safetensors`, SWA snapshots)
carries its config in the safetensors metadata and has a sidecar `NAME.sha256` in
`sha256sum` format (a file cannot hold the hash of itself); `read_weights` refuses a file
whose bytes do not match it, so `eval`, `sample`, ensembles and distillation teachers never
run on corrupt weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import SlowrunError
from .config import RunConfig, config_from_dict, config_to_dict
from .gpt import GPT, loop_active_at
from .rundir import RunDir
from .storage import (atomic_directory, atomic_write_text, read_json, remove_leftovers, sha256_file, sha256_json,
                      umask_mode)

_STEP_RE = re.compile(r"^step_(\d{7,})$")
_LEFTOVER_RE = re.compile(r"^\.(step_\d{7,})\.")  # what atomic_directory leaves beside step_NNNNNNN
CKPT_FORMAT = "slowrun-checkpoint/2"  # /2: state.json holds a sha256 of its own content


class CheckpointError(SlowrunError):
    pass


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def sidecar(path: Path) -> Path:
    """Where the sha256 of a weights file lives: NAME.sha256 beside it."""
    return path.with_name(path.name + ".sha256")


def _write_weights_file(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """Write tensors + metadata to a temp file, rename it into place, then its sidecar; returns the sha256.

    A crash between the two renames leaves a file that does not match its sidecar, which
    `read_weights` refuses: the failure is loud, never a silent wrong load.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(_contiguous(state), str(tmp), metadata=meta)
        umask_mode(tmp)  # safetensors creates 0600 whatever the umask
        digest = sha256_file(tmp)
        tmp.replace(path)
        atomic_write_text(sidecar(path), f"{digest}  {path.name}\n")
    except (SafetensorError, OSError) as e:  # e.g. the disk is full: say so in one line, leave no temp file
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {str(e).splitlines()[0][:160]}") from None
    return digest


def save_weights(path: str | Path, state: dict[str, torch.Tensor], cfg: RunConfig, extra: dict | None = None) -> None:
    """Weights + resolved config (metadata) + the sidecar sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "slowrun-weights/1", "config": json.dumps(config_to_dict(cfg))}
    if extra:
        meta["extra"] = json.dumps(extra)
    _write_weights_file(path, state, meta)


def verify_weights(path: Path) -> None:
    """Refuse a weights file whose sha256 is not the one in its sidecar (or that has none)."""
    side = sidecar(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: no {side.name} beside it, so it cannot be verified (written by an older "
                              f"slowrun?); if you trust it: (cd {path.parent} && sha256sum {path.name} > {side.name})")
    words = side.read_text().split()  # sha256sum format: "HEX  NAME"
    if sha256_file(path) != (words[0] if words else ""):
        raise CheckpointError(f"{path}: corrupt (sha256 does not match {side.name}; truncated or modified)")


def _safe_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], RunConfig, dict]:
    """Load a standalone weights file; returns (state dict, config, extra metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a slowrun weights file (only .safetensors is read, never pickles)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    if "config" not in meta:
        raise CheckpointError(f"{path}: no slowrun config in its metadata")
    verify_weights(path)
    state = _safe_load(path)
    cfg = config_from_dict(json.loads(meta["config"]))
    return state, cfg, json.loads(meta.get("extra", "{}"))


# ---------------------------------------------------------------------------------------
# training checkpoints


def _flatten_optim(states: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for i, st in enumerate(states):
        for pid, pstate in st["state"].items():
            for key, val in pstate.items():
                name = f"opt{i}.{pid}.{key}"
                if isinstance(val, torch.Tensor):
                    tensors[name] = val
                else:
                    scalars[name] = val
    return tensors, scalars


def _unflatten_optim(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], n: int) -> list[dict]:
    states: list[dict] = [{} for _ in range(n)]
    for name, val in list(tensors.items()) + list(scalars.items()):
        if not name.startswith("opt"):
            continue
        i, pid, key = name[3:].split(".", 2)
        states[int(i)].setdefault(int(pid), {})[key] = val
    return states


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict  # state.json
    model: dict[str, torch.Tensor]
    extra_tensors: dict[str, torch.Tensor]  # optimizer moments, ema

    def optimizer_states(self, n: int) -> list[dict]:
        return _unflatten_optim(self.extra_tensors, self.state["optim_scalars"], n)

    def ema(self) -> dict[str, torch.Tensor] | None:
        ema = {k[4:]: v for k, v in self.extra_tensors.items() if k.startswith("ema.")}
        return ema or None


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, model_state: dict[str, torch.Tensor],
                    optim_states: list[dict], extra: dict, ema: dict[str, torch.Tensor] | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoints/step_NNNNNNN atomically and keep the newest `keep`.

    No random state is saved: the trainer reseeds every step from (seed, rank, step).
    """
    ckdir = RunDir(run_dir).checkpoints
    final = ckdir / f"step_{step:07d}"
    opt_tensors, opt_scalars = _flatten_optim(optim_states)
    extra_tensors = dict(opt_tensors)
    if ema is not None:
        extra_tensors.update({f"ema.{k}": v for k, v in ema.items()})
    with atomic_directory(final, force=True) as tmp:
        model_digest = _write_weights_file(tmp / "model.safetensors", model_state,
                                           {"format": "slowrun-weights/1", "config": json.dumps(config_to_dict(cfg))})
        try:
            save_file(_contiguous(extra_tensors), str(tmp / "optim.safetensors"))
            umask_mode(tmp / "optim.safetensors")
            state = {"format": CKPT_FORMAT, "step": step, "config": config_to_dict(cfg),
                     "optim_scalars": opt_scalars, "extra": extra,
                     "files": {"model.safetensors": model_digest, "optim.safetensors": sha256_file(tmp / "optim.safetensors")}}
            state["sha256"] = sha256_json(state)  # an edited step or loader position no longer matches
            atomic_write_text(tmp / "state.json", json.dumps(state, indent=1) + "\n")
        except (SafetensorError, OSError) as e:  # e.g. the disk is full (atomic_directory removes the partial one)
            raise CheckpointError(f"could not write a checkpoint in {ckdir}: {str(e).splitlines()[0][:160]}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoint_leftovers(run_dir: Path) -> list[str]:
    """Remove what a run killed while writing a checkpoint left in checkpoints/: the checkpoint's
    build directory (`.step_NNNNNNN.XXXXXXXX.partial`), or a replaced one's old copy (put back
    where the new one never took its place). Call it only holding the run's lock. Returns the
    names removed."""
    ckdir = RunDir(run_dir).checkpoints
    if not ckdir.is_dir():
        return []
    names = sorted({m.group(1) for p in ckdir.iterdir() if (m := _LEFTOVER_RE.match(p.name))})
    return [gone for name in names for gone in remove_leftovers(ckdir / name)]


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory (checkpoints/step_NNNNNNN) was written at."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory (step_NNNNNNN)")
    return int(m.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first."""
    ckdir = RunDir(run_dir).checkpoints
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint directory; raises CheckpointError if anything is off."""
    path = Path(path)
    sj = path / "state.json"
    if not sj.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no state.json)")
    state = read_json(sj, CheckpointError)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        why = " (written by an older slowrun: no hash of its own)" if fmt == "slowrun-checkpoint/1" else ""
        raise CheckpointError(f"{sj}: unknown checkpoint format {fmt!r}{why}")
    body = {k: v for k, v in state.items() if k != "sha256"}
    if state.get("sha256") != sha256_json(body):
        raise CheckpointError(f"{sj}: edited or corrupt (its sha256 does not match its content)")
    for name, digest in state["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} is corrupt (sha256 does not match; truncated or modified)")
    return Checkpoint(path, int(state["step"]), state, _safe_load(path / "model.safetensors"),
                      _safe_load(path / "optim.safetensors"))


def latest_good_checkpoint(run_dir: Path, log=print) -> Checkpoint | None:
    """The newest checkpoint that loads and verifies; broken ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: skipping checkpoint: {e}")
    return None


def weights_path(ref: str | Path) -> Path:
    """A run directory (its final model.safetensors, else its latest checkpoint), a checkpoint
    directory, or a .safetensors file."""
    p = Path(ref)
    if p.is_dir():
        if RunDir(p).weights("final").is_file():
            return RunDir(p).weights("final")
        ckpts = list_checkpoints(p)
        if ckpts:
            return ckpts[-1] / "model.safetensors"
        raise CheckpointError(f"{p}: no model.safetensors and no checkpoints inside")
    if not p.exists():
        raise CheckpointError(f"no such run, checkpoint or weights file: {p}")
    return p


def load_model(ref: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, its config, weights metadata) from a run, checkpoint or weights file."""
    state, cfg, extra = read_weights(weights_path(ref))
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ref}: weights do not fit the model its config describes ({str(e).splitlines()[0]})") from None
    # looped as when the weights were written; files without the note: as at the end of the configured run
    model.loop_active = bool(extra.get("loop_active", loop_active_at(cfg.model, math.ceil(cfg.train.epochs) - 1)))
    return model.to(device).eval(), cfg, extra
