import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slowrun.jobs import DevicePool, PlacementError, TrainJob, device_ids, run_jobs

# A stand-in for `slowrun train`: holds each of its CUDA_VISIBLE_DEVICES ids as an exclusive
# file while it runs (a second holder of the same id fails), notes how many jobs run beside
# it, then writes result.json.
FAKE = """
import json, os, sys, time
work, run_dir = sys.argv[1], sys.argv[2]
ids = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
held = [os.open(os.path.join(work, "dev" + d), os.O_CREAT | os.O_EXCL) for d in ids]  # FileExistsError if shared
mine = os.path.join(work, "running", os.path.basename(run_dir))
open(mine, "w").close()
running = len(os.listdir(os.path.join(work, "running")))
time.sleep(1.0)
os.remove(mine)
for d, fd in zip(ids, held):
    os.close(fd)
    os.remove(os.path.join(work, "dev" + d))
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({"ids": ids, "running": running}, f)
"""


class FakeJob(TrainJob):
    def command(self, threads: int = -1, nproc: int = 1) -> list[str]:
        self.nproc = nproc
        return [sys.executable, "-c", FAKE, str(self.data), str(self.run_dir)]

    def result(self) -> dict:  # the fakes write what they saw, not a run's result.json
        return json.loads((self.run_dir / "result.json").read_text())


def fake_jobs(tmp_path: Path, n: int) -> list[FakeJob]:
    (tmp_path / "running").mkdir()
    return [FakeJob(tmp_path / "runs" / f"job{i}", "smoke", tmp_path) for i in range(n)]


def test_jobs_on_fake_devices_get_distinct_ids_and_never_more_than_the_devices(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = fake_jobs(tmp_path, 5)
    done = []
    failures = run_jobs(jobs, parallel=1, progress=False, on_done=done.append, num_devices=3)
    assert failures == {}
    assert sorted(j.run_dir.name for j in done) == [f"job{i}" for i in range(5)]  # on_done still called for each
    results = [j.result() for j in jobs]
    assert all(len(r["ids"]) == 1 and r["ids"][0] in {"0", "1", "2"} for r in results)
    running = [r["running"] for r in results]
    assert max(running) <= 3  # never more jobs at once than devices
    assert max(running) >= 2  # `parallel=1` is for CPU: the devices set the concurrency


# As FAKE, but a device may be shared: each job notes how many jobs hold its device beside it.
SHARED = """
import json, os, sys, time
work, run_dir = sys.argv[1], sys.argv[2]
(d,) = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
mine = os.path.join(work, "running", "dev" + d + "-" + os.path.basename(run_dir))
open(mine, "w").close()
time.sleep(1.5)
names = os.listdir(os.path.join(work, "running"))
on_mine, running = sum(n.startswith("dev" + d + "-") for n in names), len(names)
time.sleep(0.2)
os.remove(mine)
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({"ids": [d], "on_device": on_mine, "running": running}, f)
"""


class SharedJob(FakeJob):
    def command(self, threads: int = -1, nproc: int = 1) -> list[str]:
        return [sys.executable, "-c", SHARED, str(self.data), str(self.run_dir)]


def test_jobs_share_each_device_with_parallel(tmp_path, monkeypatch):
    """`--jobs 2` on 2 devices: 4 at once, never more than 2 on a device."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "running").mkdir()
    jobs = [SharedJob(tmp_path / "runs" / f"job{i}", "smoke", tmp_path) for i in range(6)]
    assert run_jobs(jobs, parallel=2, progress=False, num_devices=2) == {}
    results = [j.result() for j in jobs]
    assert all(r["ids"][0] in {"0", "1"} for r in results)
    assert max(r["on_device"] for r in results) == 2 and max(r["running"] for r in results) <= 4
    with pytest.raises(PlacementError, match="share a device only with one device each"):
        run_jobs(jobs[:1] + [SharedJob(tmp_path / "runs" / "new", "smoke", tmp_path)], parallel=2, progress=False,
                 gpus_per_job=2, num_devices=4)


def test_gpus_per_job_gives_each_job_its_own_devices_through_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = fake_jobs(tmp_path, 3)
    assert run_jobs(jobs, progress=False, gpus_per_job=2, num_devices=5) == {}  # `sweep --gpus-per-job 2`
    results = [j.result() for j in jobs]
    assert all(len(set(r["ids"])) == 2 and set(r["ids"]) <= {"0", "1", "2", "3", "4"} for r in results)
    assert max(r["running"] for r in results) <= 2  # 5 devices hold two 2-device jobs
    assert all(j.nproc == 2 for j in jobs)
    cmd = TrainJob(tmp_path / "r", "smoke", tmp_path).command(nproc=2)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert cmd[6:8] == ["slowrun", "train"]
    # the launcher exists as `python -m torch.distributed.run`
    assert subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True).returncode == 0


def test_cpu_jobs_get_no_device(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = fake_jobs(tmp_path, 2)
    assert run_jobs(jobs, parallel=2, progress=False, num_devices=0) == {}
    assert all(j.result()["ids"] == [] and j.nproc == 1 for j in jobs)
    assert TrainJob(tmp_path / "r", "smoke", tmp_path).command()[1:4] == ["-m", "slowrun", "train"]


def test_placement_refuses_impossible_requests(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = fake_jobs(tmp_path, 1)
    with pytest.raises(PlacementError, match="only 3 CUDA device"):
        run_jobs(jobs, progress=False, gpus_per_job=4, num_devices=3)
    with pytest.raises(PlacementError, match="no CUDA device"):
        run_jobs(jobs, progress=False, gpus_per_job=2, num_devices=0)
    with pytest.raises(PlacementError, match="--gpus-per-job"):
        run_jobs(jobs, progress=False, gpus_per_job=0, num_devices=3)


def test_device_ids_stay_inside_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert device_ids(2) == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert device_ids(3) == ["0", "1", "2"]
    pool = DevicePool(["0", "1", "2"])
    a, b = pool.take(2), pool.take(1)
    assert sorted(a + b) == ["0", "1", "2"]
    pool.give(a)
    assert sorted(pool.take(2)) == sorted(a)


# A stand-in that writes the trainer's step lines to its log.txt, slowly, then finishes.
STEPPING = """
import json, os, sys, time
run_dir = sys.argv[1]
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "log.txt"), "w") as log:
    log.write("slowrun 0.1 | torch 2.13.0\\n")
    for step in (1, 2):
        log.write(f"step {step:>7}/10 | epoch   0.10 | loss 5.0000 | lr 1.000 | gnorm 1.000 | 144 tok/s | "
                  f"elapsed 0m0{step}s | ETA 1m{step}0s\\n")
        log.flush()
        time.sleep(0.8)
with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({}, f)
"""


class SteppingJob(FakeJob):
    def command(self, threads: int = -1, nproc: int = 1) -> list[str]:
        return [sys.executable, "-c", STEPPING, str(self.run_dir)]


def test_running_jobs_report_their_step_and_eta(tmp_path, capsys):
    """A sweep's runs take hours: without a bar, the running jobs' steps and ETAs (from their
    log.txt) are printed every status_every_s seconds, so the log of a long sweep shows where it is."""
    jobs = [SteppingJob(tmp_path / "runs" / "4x" / "depth=9_seed=1-bab19250", "smoke", tmp_path)]
    assert run_jobs(jobs, progress=False, desc="seeds", status_every_s=0.3) == {}
    out = capsys.readouterr().out
    assert "seeds: 0/1 done; running: 4x/depth=9_seed=1 1/10 ETA 1m10s" in out
    assert "4x/depth=9_seed=1 2/10 ETA 1m20s" in out
    # once a job has finished, the count says so, with every job's ETA at the pace so far
    two = [SteppingJob(tmp_path / "runs" / "1x" / f"depth=2_seed={s}-0000000{s}", "smoke", tmp_path) for s in (0, 1)]
    assert run_jobs(two, parallel=1, progress=False, desc="seeds", status_every_s=0.3) == {}
    out = capsys.readouterr().out
    assert "seeds: 0/2 done; running: 1x/depth=2_seed=0 1/10" in out
    assert re.search(r"seeds: 1/2 done, all ETA 0m0[1-5]s; running: 1x/depth=2_seed=1", out), out


# A stand-in for `slowrun train` that fails: a traceback on stderr, or killed by a signal.
FAILING = """
import os, signal, sys
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
raise ValueError("split of 4000 tokens is shorter than one chunk of 16385")
"""


class FailingJob(FakeJob):
    def command(self, threads: int = -1, nproc: int = 1) -> list[str]:
        return [sys.executable, "-c", FAILING, self.tag["how"]]


def test_failed_jobs_are_one_line_each(tmp_path):
    """issue 35, item 1: a failure is the last line of the job's stderr (no traceback), a job
    killed by a signal says which; the error a runner raises names every failed job on a line
    of its own."""
    from slowrun.jobs import JobsFailed

    jobs = [FailingJob(tmp_path / "runs" / how, "smoke", tmp_path, tag={"how": how}) for how in ("raise", "kill")]
    failures = run_jobs(jobs, parallel=2, progress=False)
    assert failures == {jobs[0].run_dir: "ValueError: split of 4000 tokens is shorter than one chunk of 16385",
                        jobs[1].run_dir: "killed by SIGKILL"}
    e = JobsFailed(failures, "the curve was not written")
    assert str(e).splitlines() == ["2 run(s) failed; the curve was not written:",  # in the run directories' order
                                   f"  {jobs[1].run_dir}: killed by SIGKILL",
                                   f"  {jobs[0].run_dir}: ValueError: split of 4000 tokens is shorter than one chunk of 16385"]


# A stand-in for `slowrun train` that stops as a run does: on SIGINT or SIGTERM it finishes its
# "step", "checkpoints" and exits 128 + the signal. It notes its pid and its parent's once its
# handlers are in place, and every signal it got (a second one would stop a real run at once,
# without its checkpoint). RANK is set by torchrun.
TRAINER = """
import os, signal, sys, time
run_dir, rank = sys.argv[1], os.environ.get("RANK", "0")
os.makedirs(run_dir, exist_ok=True)
got = []
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda s, f: got.append(s))
with open(os.path.join(run_dir, f"pid{rank}.tmp"), "w") as f:
    f.write(f"{os.getpid()} {os.getppid()}")
os.rename(os.path.join(run_dir, f"pid{rank}.tmp"), os.path.join(run_dir, f"pid{rank}"))
t0 = time.time()
while not got and time.time() - t0 < 60:  # never outlives the test by long
    time.sleep(0.05)
time.sleep(0.5)  # the rest of the step, then the checkpoint
with open(os.path.join(run_dir, f"stopped{rank}"), "w") as f:
    f.write(" ".join(map(str, got)))
sys.exit(128 + got[0] if got else 1)
"""

# `slowrun ensemble` whose members are the stand-in above (through torchrun with --gpus-per-job
# 2, on two pretended devices): the real command-line path, its exit code and its message.
RUNNER = """
import sys
from slowrun import jobs
from slowrun.cli import main

trainer = sys.argv[1]

def command(self, threads=-1, nproc=1):
    launch = jobs.torchrun(nproc) if nproc > 1 else [sys.executable]
    return launch + [trainer, str(self.run_dir)]

jobs.TrainJob.command = command
jobs.device_ids = lambda num_devices=None: ["0", "1"] if "--gpus-per-job" in sys.argv else []
sys.exit(main(sys.argv[2:]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").is_file() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _stop_runner(tmp_path, bpe_ds, args, signum, ranks):
    """Start the runner, wait until each rank of the first member has its handlers in place,
    send `signum` to the runner alone; returns (runner's result, the ranks' pid files' pids)."""
    trainer = tmp_path / "trainer.py"
    trainer.write_text(TRAINER)
    run_dir = tmp_path / "ens"
    cmd = [sys.executable, "-c", RUNNER, str(trainer), "ensemble", "--recipe", "smoke", "--data", str(bpe_ds),
           "--run-dir", str(run_dir), "--no-progress", *args]
    # the runner as a terminal starts it, SIGINT at its default: under a shell's `cmd &` (a CI harness, `nohup
    # ... &`) it is inherited ignored, and a runner rightly leaves an ignored signal ignored
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids: list[int] = []
    try:
        pid_files = [run_dir / f"member_{m}" / f"pid{r}" for m, r in ranks]
        t0 = time.time()
        while not all(f.is_file() for f in pid_files):
            assert p.poll() is None and time.time() - t0 < 60, p.communicate()
            time.sleep(0.05)
        pids = [int(x) for f in pid_files for x in f.read_text().split()]  # each rank, its parent (the runner or torchrun)
        os.kill(p.pid, signum)
        out, err = p.communicate(timeout=30)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err), pids
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid in pids:  # an orphan of the code under test: never left running
            if pid != p.pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_running_jobs_and_starts_no_more(tmp_path, bpe_ds):
    """issue 35, item 2: SIGTERM to a job runner reaches each running job once (it checkpoints
    and exits), starts no further job, waits for them and says in one line how to resume."""
    r, pids = _stop_runner(tmp_path, bpe_ds, ["--members", "3", "--jobs", "2"], signal.SIGTERM, [(0, 0), (1, 0)])
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "SIGTERM" in r.stderr and "same command" in r.stderr
    for m in (0, 1):  # each got the signal once: a second one would have stopped it before its checkpoint
        assert (tmp_path / "ens" / f"member_{m}" / "stopped0").read_text() == str(int(signal.SIGTERM))
    assert not (tmp_path / "ens" / "member_2").exists()  # never started
    assert not any(_alive(pid) for pid in pids[::2])  # no orphan


def test_sigint_stops_a_torchrun_job_and_its_ranks(tmp_path, bpe_ds):
    """issue 35, item 2: with --gpus-per-job 2 a job is torchrun and its ranks: SIGINT to the
    runner reaches each rank once (through torchrun), and none of them outlives the runner."""
    r, pids = _stop_runner(tmp_path, bpe_ds, ["--members", "1", "--gpus-per-job", "2"], signal.SIGINT, [(0, 0), (0, 1)])
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.strip().endswith("run the same command again to resume")
    for rank in (0, 1):
        assert (tmp_path / "ens" / "member_0" / f"stopped{rank}").read_text() == str(int(signal.SIGINT))
    assert not any(_alive(pid) for pid in pids)  # the ranks and torchrun


@pytest.mark.skipif(not os.access("/proc/self/autogroup", os.W_OK), reason="no writable autogroup (kernel option or permissions)")
def test_a_job_keeps_the_runners_autogroup_nice_value():
    """A job starts in a session of its own, which the kernel's autogroup scheduling makes a new
    group at nice 0: a runner started at nice 19 then gave its jobs full weight against the
    test suite beside it. The runner (here in a session of its own at autogroup nice 7) copies
    its value to each job."""
    script = (
        "import os, subprocess, sys\n"
        "from pathlib import Path\n"
        "from slowrun.jobs import Children\n"
        "Path('/proc/self/autogroup').write_text('7')\n"
        "p = Children().start([sys.executable, '-c', 'import time; time.sleep(2)'], None)\n"
        "print(Path(f'/proc/{p.pid}/autogroup').read_text().split()[-1])\n"
        "p.kill()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, start_new_session=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "7"
