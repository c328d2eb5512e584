"""Training runs as subprocesses, several at a time: used by sweep, ensemble and the CPU track.

Each job is a normal run directory; a finished one (result.json) is skipped and an
interrupted one (config.toml without result.json) is resumed, so a whole sweep or
ensemble continues where it stopped.

Placement: on a machine with N CUDA devices, N // K jobs run at once, each with
`CUDA_VISIBLE_DEVICES` set to K devices of its own (K = gpus_per_job, default 1) taken from
a pool and given back when it ends; a job with K > 1 is launched through torchrun
(`python -m torch.distributed.run --standalone --nproc_per_node=K`, a free rendezvous port
each). With K = 1, `parallel` jobs share each device (small models, such as the CPU track's
curve, leave a GPU mostly idle one at a time). Without CUDA, `parallel` jobs run at once
with no device assignment.

A run takes minutes to hours, so while jobs run their progress is read from their log.txt
(the trainer's step line: step, total, ETA): shown beside the bar, or, without a bar, printed
as one line every few minutes for the logs of long unattended sweeps.

Faults: a job that fails is one line (the last line of its stderr, or the signal that killed
it); the caller raises `JobsFailed` naming every one, so a runner never exits 0 with a failed
job. Stopping: each job runs in a process group of its own (a Ctrl-C at the terminal reaches
the runner alone), and SIGINT, SIGTERM or SIGHUP to the runner is passed on to every running
job, which checkpoints and exits as a run does; the runner starts no other job, waits for them
and raises `JobsInterrupted` (exit 128 + the signal): the same command again resumes them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from . import SlowrunError
from .results import read_result
from .rundir import RunDir
from .runlog import fmt_time


def keep_autogroup_nice(pid: int) -> None:
    """Give a child started in a session of its own the runner's autogroup nice value. With the
    kernel's autogroup scheduling a new session is a new scheduling group at nice 0, whatever
    the runner's niceness: jobs of a sweep started at nice 19 (dev/long_run.sh) took two thirds
    of a 2-core machine from the test suite beside them (measured: 66% and 64% CPU for the two
    jobs). Nothing happens where /proc has no autogroup (no such kernel option, or not Linux)."""
    try:
        nice = Path("/proc/self/autogroup").read_text().split()[-1]
        if nice != "0":
            Path(f"/proc/{pid}/autogroup").write_text(nice)
    except (OSError, IndexError):
        pass


class PlacementError(SlowrunError):
    pass


class JobsFailed(SlowrunError):
    """Jobs that failed, one line each (run directory: its error, in the directories' order),
    after a head line saying what the command kept or skipped because of them. `partial` is
    what the command still wrote (a curve, a table), for the command line to print first."""

    def __init__(self, failures: dict[Path, str], what: str = "", partial: Any = None) -> None:
        self.failures, self.partial = dict(failures), partial
        head = f"{len(failures)} run(s) failed" + (f"; {what}" if what else "") + ":"
        lines = [f"  {d}: {e}" for d, e in sorted(failures.items(), key=lambda x: str(x[0]))]
        super().__init__("\n".join([head] + lines))


class JobsInterrupted(KeyboardInterrupt):
    """A signal stopped a job runner once its running jobs had stopped; `exit_code` is 128 + the
    signal number (the command line exits with it, as `train` does)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def device_ids(num_devices: int | None = None) -> list[str]:
    """The CUDA devices this process may hand out, as `CUDA_VISIBLE_DEVICES` entries: its own
    visible list when that is set (so a job never lands outside it), else 0..N-1.
    `num_devices` (default torch.cuda.device_count()) can be given, e.g. to fake devices."""
    if num_devices is None:
        num_devices = torch.cuda.device_count()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:num_devices] if visible else [str(i) for i in range(num_devices)]


class DevicePool:
    """Free device ids; `take(k)` waits until k are free and returns them, `give(ids)` returns them."""

    def __init__(self, ids: list[str]) -> None:
        self.free = list(ids)
        self.size = len(ids)
        self._cond = threading.Condition()

    def take(self, k: int) -> list[str]:
        if k > self.size:
            raise PlacementError(f"--gpus-per-job {k}: only {self.size} CUDA device(s) here")
        with self._cond:
            self._cond.wait_for(lambda: len(self.free) >= k)
            ids, self.free = self.free[:k], self.free[k:]
            return ids

    def give(self, ids: list[str]) -> None:
        with self._cond:
            self.free.extend(ids)
            self._cond.notify_all()


def torchrun(nproc: int) -> list[str]:
    """The launcher of `nproc` local ranks, a free rendezvous port each time (follow it with a
    script or `-m module`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


@dataclass
class TrainJob:
    run_dir: Path
    recipe: str
    data: Path | str
    overrides: dict[str, Any] = field(default_factory=dict)
    tag: dict[str, Any] = field(default_factory=dict)  # what the caller needs to know the job by

    def done(self) -> bool:
        return RunDir(self.run_dir).finished()

    def command(self, threads: int = -1, nproc: int = 1) -> list[str]:
        """The `slowrun train` command line; with nproc > 1 launched by torchrun, nproc ranks."""
        launch = [sys.executable, "-m", "slowrun"] if nproc == 1 else [*torchrun(nproc), "-m", "slowrun"]
        if RunDir(self.run_dir).config.is_file():  # interrupted earlier: continue it exactly
            return launch + ["train", "--resume", str(self.run_dir), "--quiet"]
        over = {**self.overrides, "train.progress": False}
        if threads > 0:
            over["train.num_threads"] = threads
        return launch + ["train", "--recipe", self.recipe, "--data", str(self.data),
                         "--run-dir", str(self.run_dir), "--quiet"] + [f"--{k}={json.dumps(v)}" for k, v in over.items()]

    def result(self) -> dict:
        """The run's result.json, through the validating reader (a damaged one is one line)."""
        return read_result(self.run_dir)


# the signals a job runner passes on to its jobs, as the signal they get (`slowrun train` checkpoints
# on SIGINT and SIGTERM; SIGHUP would kill it before its checkpoint)
FORWARD = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
# how long torchrun waits for its ranks to stop after passing a signal on, before SIGKILL (its
# default, 30 s, can be shorter than a step, an evaluation and a checkpoint of a large model)
TORCHRUN_SHUTDOWN_S = 600


class Children:
    """The running jobs' processes. Each starts in a session (so a process group) of its own:
    a Ctrl-C at the terminal reaches the runner alone, and the runner passes it on once.

    While active in the main thread, SIGINT, SIGTERM and SIGHUP (unless ignored, as under
    `nohup`) set `signum`, stop new jobs from starting and are passed on to every running job's
    process group (`FORWARD`); a second signal is passed on too (a run then stops at once).
    torchrun passes a signal on to its ranks (their own sessions) and waits for them."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()  # never taken by the main thread but in the handler
        self._previous: dict[int, Any] = {}

    def start(self, cmd: list[str], env: dict[str, str] | None) -> subprocess.Popen | None:
        """The job's process, or None once a signal came (the job is left for the next run)."""
        with self._lock:
            if self.signum is not None:
                return None
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 start_new_session=True)
            keep_autogroup_nice(p.pid)
            self._procs.append(p)
            return p

    def wait(self, p: subprocess.Popen) -> tuple[int, str, str]:
        out, err = p.communicate()
        with self._lock:
            self._procs.remove(p)
        return p.returncode, out, err

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        with self._lock:
            for p in self._procs:
                if p.returncode is None:
                    try:
                        os.killpg(p.pid, FORWARD[signal.Signals(signum)])
                    except (ProcessLookupError, PermissionError):  # it has just ended
                        pass

    def __enter__(self) -> "Children":
        if threading.current_thread() is threading.main_thread():
            for s in FORWARD:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def failure_line(returncode: int, stderr: str, stdout: str = "") -> str:
    """A failed job in one line: the last line of its stderr (a traceback's is the error), else the
    signal that killed it or its exit code."""
    lines = (stderr or stdout).strip().splitlines()
    if lines:
        return lines[-1]
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            pass
    return f"exit code {returncode}"


STEP_LINE = re.compile(r"step\s+(\d+)/(\d+) .*\| ETA (\S+)")


def job_status(job: TrainJob) -> str | None:
    """`4x/depth=9_seed=1 194/1024 ETA 1h38m27s`: a running job's last step line in its log.txt,
    or None before its first step."""
    try:
        with open(RunDir(job.run_dir).log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        m = STEP_LINE.search(line)
        if m:
            name = job.run_dir.name.rsplit("-", 1)[0]  # without the config hash
            return f"{job.run_dir.parent.name}/{name} {m[1]}/{m[2]} ETA {m[3]}"
    return None


def run_jobs(jobs: list[TrainJob], parallel: int = 1, threads: int = -1, progress: bool = True,
             desc: str = "runs", on_done: Callable[[TrainJob], None] | None = None,
             gpus_per_job: int = 1, num_devices: int | None = None, status_every_s: float | None = None) -> dict[Path, str]:
    """Train every unfinished job; returns failures (run dir -> its error in one line: the caller
    raises `JobsFailed`, or says why a failure is no fault). `on_done(job)` is called (one at a
    time) as soon as each job has finished, e.g. to record it. SIGINT, SIGTERM or SIGHUP stops
    the running jobs (see `Children`) and raises `JobsInterrupted` once they have ended.
    Every `status_every_s` seconds (default 10 with the bar, 600 without) the running jobs' steps
    and ETAs are shown beside the bar, or printed as one line.

    With CUDA devices (`num_devices`, default torch.cuda.device_count()), N // gpus_per_job
    jobs run at once, each on devices of its own, or with gpus_per_job = 1, `parallel` jobs on
    each device; without, `parallel` at a time."""
    todo = [j for j in jobs if not j.done()]
    failures: dict[Path, str] = {}
    if not todo:
        return failures
    k = gpus_per_job
    ids = device_ids(num_devices)
    if k < 1:
        raise PlacementError(f"--gpus-per-job: must be >= 1, got {k}")
    if ids and k > len(ids):
        raise PlacementError(f"--gpus-per-job {k}: only {len(ids)} CUDA device(s) here")
    if not ids and k > 1:
        raise PlacementError(f"--gpus-per-job {k}: no CUDA device here")
    if ids and k > 1 and parallel > 1:
        raise PlacementError(f"--jobs {parallel} with --gpus-per-job {k}: jobs share a device only with one device each")
    pool = DevicePool(ids * max(1, parallel)) if ids else None  # with k = 1, `parallel` slots per device
    workers = pool.size // k if pool is not None else max(1, parallel)
    lock = threading.Lock()
    bar = tqdm(total=len(todo), unit="run", desc=desc, disable=not progress, dynamic_ncols=True)
    running: list[TrainJob] = []
    finished = 0  # the bar counts nothing when disabled
    stopped = 0  # jobs a signal stopped
    t0 = time.time()
    stop = threading.Event()
    children = Children()

    def report_status() -> None:
        while not stop.wait(status_every_s or (10.0 if progress else 600.0)):
            with lock:
                status = [s for s in map(job_status, running) if s]
            if status and progress:
                bar.set_postfix_str("; ".join(status))
            elif status:
                n = finished  # every job's ETA at the pace of those finished in this call
                eta = f", all ETA {fmt_time((time.time() - t0) / n * (len(todo) - n))}" if n else ""
                print(f"{desc}: {n}/{len(todo)} done{eta}; running: " + "; ".join(status), flush=True)

    def work(job: TrainJob) -> None:
        nonlocal finished, stopped
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        held = pool.take(k) if pool is not None else None
        try:
            env = None if held is None else {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(held)}
            if k > 1:
                env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(TORCHRUN_SHUTDOWN_S), **(env or os.environ)}
            p = children.start(job.command(threads, k), env)
            if p is None:  # stopped by a signal before it started
                return
            with lock:
                running.append(job)
            returncode, out, err = children.wait(p)
        finally:
            if held is not None:
                pool.give(held)
        with lock:
            running.remove(job)
            if returncode != 0 and children.signum is not None:
                stopped += 1  # by the signal (a run writes a checkpoint): the next call resumes it, no failure
                return  # and not finished: the bar does not count it
            if returncode != 0:
                failures[job.run_dir] = failure_line(returncode, err, out)
                bar.write(f"failed: {job.run_dir}: {failures[job.run_dir]}")
            elif on_done is not None:
                on_done(job)
            finished += 1
            bar.update(1)

    reporter = threading.Thread(target=report_status, daemon=True)
    reporter.start()
    try:
        with children, ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(work, todo))
    finally:
        stop.set()
        reporter.join()
        bar.set_postfix_str("", refresh=False)  # the finished jobs' last steps are no status
        bar.close()
    if children.signum is not None:
        name = signal.Signals(children.signum).name
        raise JobsInterrupted(f"{name}: stopped {stopped} running job(s) and started no other; "
                              "run the same command again to resume", 128 + children.signum)
    return failures
