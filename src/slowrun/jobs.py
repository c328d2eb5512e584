"""Training runs as subprocesses, several at a time: used by sweep, ensemble and the CPU track.

Each job is a normal run directory; a finished one (result.json) is skipped and an
interrupted one (config.toml without result.json) is resumed, so a whole sweep or
ensemble continues where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm


@dataclass
class TrainJob:
    run_dir: Path
    recipe: str
    data: Path | str
    overrides: dict[str, Any] = field(default_factory=dict)
    tag: dict[str, Any] = field(default_factory=dict)  # what the caller needs to know the job by

    def done(self) -> bool:
        return (self.run_dir / "result.json").is_file()

    def command(self, threads: int = -1) -> list[str]:
        if (self.run_dir / "config.toml").is_file():  # interrupted earlier: continue it exactly
            return [sys.executable, "-m", "slowrun", "train", "--resume", str(self.run_dir), "--quiet"]
        over = {**self.overrides, "train.progress": False}
        if threads > 0:
            over["train.num_threads"] = threads
        return [sys.executable, "-m", "slowrun", "train", "--recipe", self.recipe, "--data", str(self.data),
                "--run-dir", str(self.run_dir), "--quiet"] + [f"--{k}={json.dumps(v)}" for k, v in over.items()]

    def result(self) -> dict:
        return json.loads((self.run_dir / "result.json").read_text())


def run_jobs(jobs: list[TrainJob], parallel: int = 1, threads: int = -1, progress: bool = True,
             desc: str = "runs", on_done: Callable[[TrainJob], None] | None = None) -> dict[Path, str]:
    """Train every unfinished job, `parallel` at a time; returns failures (run dir -> last error line).
    `on_done(job)` is called (one at a time) as soon as each job has finished, e.g. to record it."""
    todo = [j for j in jobs if not j.done()]
    failures: dict[Path, str] = {}
    if not todo:
        return failures
    lock = threading.Lock()
    bar = tqdm(total=len(todo), unit="run", desc=desc, disable=not progress, dynamic_ncols=True)

    def work(job: TrainJob) -> None:
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(job.command(threads), capture_output=True, text=True)
        with lock:
            if r.returncode != 0:
                lines = (r.stderr or r.stdout).strip().splitlines()
                failures[job.run_dir] = lines[-1] if lines else f"exit code {r.returncode}"
                bar.write(f"failed: {job.run_dir}: {failures[job.run_dir]}")
            elif on_done is not None:
                on_done(job)
            bar.update(1)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(work, todo))
    bar.close()
    return failures
