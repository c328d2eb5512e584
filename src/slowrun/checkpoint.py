"""Checkpoints: safetensors for tensors, JSON for everything else; never unpickled.

A training checkpoint is a directory `checkpoints/step_0000123/` holding

    model.safetensors   the weights (the resolved config in the file's metadata)
    optim.safetensors   optimizer moments, RNG states, EMA weights
    state.json          step, loader position, scalar optimizer state, the config, extras,
                        and the sha256 of both tensor files

It is written under a temporary name and renamed, and the last `keep` are kept. Loading
checks every hash, so a truncated or garbled checkpoint is refused with a clear error and
resume falls back to the previous good one. Standalone weight files (`model.safetensors`,
`ema.safetensors`, SWA snapshots) carry their config in the safetensors metadata.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import SlowrunError
from .config import RunConfig, config_from_dict, config_to_dict
from .storage import atomic_directory, atomic_write_text, sha256_file

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(SlowrunError):
    pass


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_weights(path: str | Path, state: dict[str, torch.Tensor], cfg: RunConfig, extra: dict | None = None) -> None:
    """Weights + resolved config (metadata), written to a temp file and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"format": "slowrun-weights/1", "config": json.dumps(config_to_dict(cfg))}
    if extra:
        meta["extra"] = json.dumps(extra)
    save_file(_contiguous(state), str(tmp), metadata=meta)
    tmp.replace(path)


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
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    if "config" not in meta:
        raise CheckpointError(f"{path}: no slowrun config in its metadata")
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
    extra_tensors: dict[str, torch.Tensor]  # optimizer moments, rng, ema

    @property
    def config(self) -> RunConfig:
        return config_from_dict(self.state["config"])

    def optimizer_states(self, n: int) -> list[dict]:
        return _unflatten_optim(self.extra_tensors, self.state["optim_scalars"], n)

    def ema(self) -> dict[str, torch.Tensor] | None:
        ema = {k[4:]: v for k, v in self.extra_tensors.items() if k.startswith("ema.")}
        return ema or None


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, model_state: dict[str, torch.Tensor],
                    optim_states: list[dict], extra: dict, rng: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    ckdir = Path(run_dir) / CKPT_DIR
    final = ckdir / f"step_{step:07d}"
    opt_tensors, opt_scalars = _flatten_optim(optim_states)
    extra_tensors = {**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}}
    if ema is not None:
        extra_tensors.update({f"ema.{k}": v for k, v in ema.items()})
    with atomic_directory(final, force=True) as tmp:
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"),
                  metadata={"format": "slowrun-weights/1", "config": json.dumps(config_to_dict(cfg))})
        save_file(_contiguous(extra_tensors), str(tmp / "optim.safetensors"))
        state = {"format": "slowrun-checkpoint/1", "step": step, "config": config_to_dict(cfg),
                 "optim_scalars": opt_scalars, "extra": extra,
                 "files": {n: sha256_file(tmp / n) for n in ("model.safetensors", "optim.safetensors")}}
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1) + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first."""
    ckdir = Path(run_dir) / CKPT_DIR
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
    try:
        state = json.loads(sj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{sj}: corrupt (not valid JSON)") from None
    if state.get("format") != "slowrun-checkpoint/1":
        raise CheckpointError(f"{sj}: unknown checkpoint format {state.get('format')!r}")
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
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
        ckpts = list_checkpoints(p)
        if ckpts:
            return ckpts[-1] / "model.safetensors"
        raise CheckpointError(f"{p}: no model.safetensors and no checkpoints inside")
    if not p.exists():
        raise CheckpointError(f"no such run, checkpoint or weights file: {p}")
    return p


def load_model(ref: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, its config, weights metadata) from a run, checkpoint or weights file."""
    from .gpt import GPT

    state, cfg, extra = read_weights(weights_path(ref))
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ref}: weights do not fit the model its config describes ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, extra
