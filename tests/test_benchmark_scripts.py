"""The benchmark scripts: the shell helpers (benchmarks/out_copies.sh), what a lent machine's $OUT
brings back when the script is stopped by a timeout; and summary.py's tables of the committed ledger."""

import json
import shutil
import sys
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "benchmarks" / "out_copies.sh"
needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and timeout")


def run_script(tmp_path, body: str, out: Path | None, limit: int = 3) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sh"
    script.write_text(f"set -euo pipefail\n. {HELPERS}\n{body}\n")
    env = {"PATH": "/usr/bin:/bin", **({"OUT": str(out)} if out else {})}
    return subprocess.run(["timeout", str(limit), "bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)


@needs_shell
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


@needs_shell
def test_without_out_nothing_is_copied_and_a_failure_is_the_scripts(tmp_path):
    r = run_script(tmp_path, "echo x > f\nkeep_copies f\nstoppable false\necho not reached", None)
    assert r.returncode == 1 and "not reached" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "job.sh"]
    r = run_script(tmp_path, "stoppable true\necho reached", None)
    assert r.returncode == 0 and r.stdout == "reached\n"


def summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summary.py"), *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_summary_of_the_ledger_chooses_each_budgets_best_size_on_val():
    from slowrun.track import CURVE_TUNED, TRACK

    lr, batch = CURVE_TUNED["nanochat"]  # the finished curve's; the chosen rows of the others are their own
    runs = {}  # train tokens -> {depth: {seed: (val, test)}}, computed here straight from the ledger's lines
    for line in (ROOT / "benchmarks" / "results" / "ledger.jsonl").read_text().splitlines():
        e = json.loads(line)
        cfg, best = e["config"], e["variants"][e["best"]]
        if e["tag"]["recipe"] == "nanochat" and cfg["optim"]["lr_scale"] == lr and cfg["train"]["batch_tokens"] == batch:
            runs.setdefault(e["dataset"]["train_tokens"], {}).setdefault(cfg["model"]["depth"], {})[cfg["train"]["seed"]] = (
                best["val_loss"], best["test_loss"])
    r = summary("--ledger")
    assert r.returncode == 0, r.stderr
    rows = {line.split(" | ")[2]: line for line in r.stdout.splitlines() if line.startswith("| nanochat | ")}
    assert runs and len(rows) == len(runs)
    for tokens, by_depth in runs.items():
        depth = min((d for d in by_depth if 0 in by_depth[d]), key=lambda d: by_depth[d][0][0])
        seeds = by_depth[depth].values()
        row = rows[f"{tokens:,}"]
        assert row.startswith(f"| nanochat | {tokens / TRACK.budget:g}x | ") and f"| depth {depth}" in row
        assert f"| {len(seeds)} | {sum(v for v, _ in seeds) / len(seeds):.4f} | {sum(t for _, t in seeds) / len(seeds):.4f} |" in row


def test_summary_of_an_ablation_is_its_json_row_by_row(tmp_path):
    def rec(name, tests, **kw):
        m = sum(tests) / len(tests)
        return {"technique": name, "off": kw.pop("off", {}), "seeds": len(tests), "test_losses": tests, "test_mean": m,
                "test_std": 0.01, "val_mean": m + 0.02, "val_std": None, "wall_s": 90.0, "efficiency": None, **kw}

    ab = {"format": "slowrun-ablation/1", "runs": 6, "finished": 5, "full": rec("full", [5.0, 5.1]),
          "variants": [rec("unet", [5.2, 5.3], off={"model.unet": False}, delta_test=0.2, p_hurts=0.04, p_hurts_val=0.07),
                       rec("soap", [5.0], off={"optim.matrix_optimizer": "soap", "train.epochs": 6.4}, swap=True,
                           delta_test=-0.05, p_better=None, efficiency=1.5, efficiency_extrapolated=False)]}
    (tmp_path / "ab.json").write_text(json.dumps(ab))
    r = summary("--ablation", str(tmp_path / "ab.json"))
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| technique")]
    assert rows == ["| the recipe | - | 2 | 5.0000, 5.1000 | 5.0500 +- 0.0100 | - | - | 5.0700 | - | - | 1.5 |",
                    "| unet | model.unet=False | 2 | 5.2000, 5.3000 | 5.2500 +- 0.0100 | +0.2000 | 0.040 | 5.2700 | 0.070 | - | 1.5 |",
                    "| soap (swap) | optim.matrix_optimizer=soap, train.epochs=6.4 | 1 | 5.0000 | 5.0000 +- 0.0100 | -0.0500 | - | "
                    "5.0200 | - | 1.50x | 1.5 |"]
    assert "partial: 5 of 6 runs finished" in r.stdout
    (tmp_path / "other.json").write_text(json.dumps({"format": "other"}))
    r = summary("--ablation", str(tmp_path / "other.json"))
    assert r.returncode == 1 and r.stderr.strip() == f"summary.py: {tmp_path / 'other.json'}: not an ablation.json of `slowrun ablate`"


def test_summary_names_a_missing_file_or_a_wrong_argument_in_one_line(tmp_path):
    for args, says in [(("--ledger", str(tmp_path / "none.jsonl")), "no such file"),
                       (("--ablation", str(tmp_path / "none.json")), "no such file"),
                       ((str(tmp_path / "none.json"),), "no such file"), (("--json",), "unexpected arguments")]:
        r = summary(*args)
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert summary("--help").stdout.startswith("Markdown tables")


def test_gpu_session_summary_projects_the_1_hour_track_from_the_two_stages(tmp_path):
    """The summary stage reads the loop-off and loop-on stages' step times: the 1-hour track's
    2,097 steps, looped from epoch 7 of 11 (953 steps), at those times; a failed stage is said."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_session
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "gpu"
    out.mkdir()
    for loop, step_s in (("off", 1.5), ("on", 1.9)):
        (out / f"limited_loop_{loop}.json").write_text(json.dumps({"step_s": step_s, "mfu": 0.4}))
    assert gpu_session.main(["summary", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["looped_steps"] == 953 and s["projected_8gpu_min"] == pytest.approx((1144 * 1.5 + 953 * 1.9) / 60)
    (out / "limited_loop_on.json").write_text(json.dumps({"error": "timed out after 200 s"}))
    assert gpu_session.main(["summary", "--out", str(out)]) == 1
    assert "loop on" in json.loads((out / "summary.json").read_text())["error"]


@pytest.mark.slow
@needs_shell
def test_gpu_session_rehearses_offline_on_the_cpu(tmp_path):
    """REHEARSE=1 runs every stage at toy size on the CPU, each writing its JSON (~3 minutes)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path / "out"),
           "DATA": str(tmp_path / "data"), "REHEARSE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    files = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").iterdir()}
    assert sorted(files) == ["attention.json", "env.json", "limited_loop_off.json", "limited_loop_on.json", "summary.json"]
    assert not any("error" in v for v in files.values())
    assert files["limited_loop_off.json"]["graph_breaks"] == 0 and files["limited_loop_off.json"]["graphs"] == 1
    assert files["limited_loop_on.json"]["graph_breaks"] == 0 and files["limited_loop_on.json"]["graphs"] == 1


def test_distill_step_benchmark_times_both_losses_and_finds_them_equal(tmp_path):
    out = tmp_path / "distill_step.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_step.py"), "--recipe", "smoke", "--vocab-size", "97",
                        "--batch-tokens", "128", "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert set(result["median_step_s"]) == {"plain", "distill_unfused", "distill_fused"}
    assert all(v > 0 for v in result["median_step_s"].values())
    assert result["loss_difference"] < 1e-4  # the two losses compute one function
    assert "fused distillation:" in r.stdout


def test_loss_kernel_benchmark_times_both_settings_and_finds_them_equal(tmp_path):
    out = tmp_path / "loss_kernel.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_kernel.py"), "--recipe", "smoke", "--vocab-size", "97",
                        "--batch-tokens", "128", "--depths", "1", "--threads", "1", "--steps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    at = json.loads(out.read_text())["threads"]["1"]
    assert at["chunk_256"]["eager_ms"] > 0 and at["chunk_256"]["compiled_ms"] > 0
    for kind in ("plain", "distill"):
        row = at["depths"]["1"][kind]
        assert row["eager_ms"] > 0 and row["compiled_ms"] > 0
        first = row["first_loss"]
        assert abs(first["compiled"] - first["eager"]) < 1e-5  # one function, built or not
