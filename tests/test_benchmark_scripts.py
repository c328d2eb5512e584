"""The benchmark scripts' shell helpers (benchmarks/out_copies.sh): what a lent machine's $OUT
brings back when the script is stopped by a timeout."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parents[1] / "benchmarks" / "out_copies.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def run_script(tmp_path, body: str, out: Path | None, limit: int = 3) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sh"
    script.write_text(f"set -euo pipefail\n. {HELPERS}\n{body}\n")
    env = {"PATH": "/usr/bin:/bin", **({"OUT": str(out)} if out else {})}
    return subprocess.run(["timeout", str(limit), "bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_timeout_stops_the_job_and_still_brings_its_files_back(tmp_path):
    out = tmp_path / "out"
    body = ("echo first > ledger.jsonl\nkeep_copies ledger.jsonl absent.json\n"
            "stoppable bash -c 'echo second >> ledger.jsonl; echo $$ > job.pid; exec sleep 60'\necho not reached")
    t = time.monotonic()
    r = run_script(tmp_path, body, out)
    assert r.returncode == 124 and time.monotonic() - t < 20 and "not reached" not in r.stdout
    # the last copy was made at exit, after the job's second line (the 20 s copier never came round)
    assert (out / "ledger.jsonl").read_text() == "first\nsecond\n"
    assert sorted(p.name for p in out.iterdir()) == ["ledger.jsonl"]  # a missing file is skipped, no .tmp left
    pid = int((tmp_path / "job.pid").read_text())
    time.sleep(0.5)
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, "the stopped job still runs"


def test_without_out_nothing_is_copied_and_a_failure_is_the_scripts(tmp_path):
    r = run_script(tmp_path, "echo x > f\nkeep_copies f\nstoppable false\necho not reached", None)
    assert r.returncode == 1 and "not reached" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "job.sh"]
    r = run_script(tmp_path, "stoppable true\necho reached", None)
    assert r.returncode == 0 and r.stdout == "reached\n"
