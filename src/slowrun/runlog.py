"""Run logging: the header (versions, device, commit, config), one fixed-format line per
step, a structured `metrics.jsonl`, a progress bar, and optional wandb / TensorBoard."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import SlowrunError, __version__
from .rundir import RunDir
from .storage import read_json_lines


def git_commit() -> str:
    """The commit of the code running: `git rev-parse` (with "-dirty" for uncommitted changes to
    tracked files) in a checkout; in a tree exported by `git archive`, which has no .git, the
    commit that `export-subst` wrote into the package's COMMIT file; else "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return exported_commit(here / "COMMIT")


def exported_commit(path: Path) -> str:
    """The commit `git archive` substituted into `path` (12 hex digits), or "unknown" where the
    file is missing or was never substituted (it then still reads "$Format:%H$")."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"
    return text[:12] if re.fullmatch(r"[0-9a-f]{40}", text) else "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    return {"slowrun": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": device_name(device), "git_commit": git_commit(), "host": platform.node(),
            "argv": " ".join(sys.argv)}


def fmt_time(seconds: float) -> str:
    """A duration to the second: 5970.02 -> '1h39m30s', 83 -> '1m23s'."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl in file order; a torn line (the last one of a killed
    run) or one that is not a JSON object is passed over."""
    return [r for _, r in read_json_lines(RunDir(run_dir).metrics, skip_corrupt=True) if isinstance(r, dict)]


class LoggingError(SlowrunError):
    pass


def require_backends(wandb: bool, tensorboard: bool) -> None:
    """Refuse, before the run directory gets any file, a logging backend that is not installed."""
    if wandb and importlib.util.find_spec("wandb") is None:
        raise LoggingError("train.wandb=true needs the wandb package: pip install 'slowrun[wandb]'")
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise LoggingError("train.tensorboard=true needs tensorboard: pip install 'slowrun[tensorboard]'")


class RunLogger:
    """Rank 0 writes `log.txt` and `metrics.jsonl` (appending, so a resumed run continues them)."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, echo: bool = True, progress_total: int = 0,
                 progress: bool = True, wandb: bool = False, tensorboard: bool = False, config: dict | None = None) -> None:
        self.main = enabled  # rank 0
        self.enabled = enabled and run_dir is not None
        self.echo = echo and enabled
        rd = RunDir(run_dir) if run_dir is not None else None
        self.log_f = open(rd.log, "a") if self.enabled else None
        self.metrics_f = open(rd.metrics, "a") if self.enabled else None
        self.bar = None
        if enabled and progress and progress_total and sys.stderr.isatty():
            self.bar = tqdm(total=progress_total, unit="step", dynamic_ncols=True, leave=False)
        self.wandb = self.tb = None
        if self.enabled and wandb:  # installed: train.setup checked it before any file was written
            import wandb as _wandb  # optional (the wandb extra)

            self.wandb = _wandb.init(project="slowrun", dir=str(run_dir), config=config, name=run_dir.name, resume="allow")
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional (the tensorboard extra)

            self.tb = SummaryWriter(str(rd.tensorboard))

    def line(self, text: str, echo: bool = True) -> None:
        """Append to log.txt; also print it (rank 0, unless quiet) when `echo`."""
        self._append(text)
        if self.echo and echo:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def _append(self, text: str) -> None:
        if self.log_f:
            self.log_f.write(text + "\n")
            self.log_f.flush()

    def warn(self, text: str) -> None:
        """Append to log.txt and print on stderr (rank 0), quiet or not."""
        self._append(text)
        if self.main:
            print(text, file=sys.stderr, flush=True)

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.metrics_f.write(json.dumps(record) + "\n")
        self.metrics_f.flush()
        step = record.get("step")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def progress(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for f in (self.log_f, self.metrics_f):
            if f:
                f.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


class StepTimer:
    """Seconds of a training step's parts, read only once the device has finished them: on CUDA
    an event is recorded at each mark (in stream order, no stall) and the step ends with one
    synchronize; elsewhere the clock. `finish` returns {part: seconds} for the parts between
    consecutive marks (the trainer's: fwd_bwd, comm, opt)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def mark(self, part: str) -> None:
        self.marks.append((part, self._now()))

    def finish(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        seconds = (lambda a, b: a.elapsed_time(b) / 1000) if self.cuda else (lambda a, b: b - a)
        return {part: seconds(prev, t) for (_, prev), (part, t) in zip(self.marks, self.marks[1:])}
