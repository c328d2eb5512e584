import argparse
import subprocess
import sys

import pytest

from slowrun.cli import count, main


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "slowrun", *args], capture_output=True, text=True, **kw)


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("prepare", "data", "train", "eval", "sample", "ensemble", "sweep", "efficiency", "record", "report", "bench",
                "ledger"):
        assert cmd in r.stdout


def test_the_command_line_is_built_without_torch():
    """Every command's parser (help, usage errors) is built without importing torch (~1.5 s here):
    a command imports it when it runs."""
    code = ("import sys; from slowrun.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("cmd", ["prepare", "data", "train", "eval", "sample", "ensemble", "sweep", "efficiency", "ledger",
                                 "record", "report", "bench"])
def test_each_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: slowrun" in capsys.readouterr().out


def test_token_counts():
    assert count("262144") == 262_144 and count("256k") == 256_000 and count("1.5M") == 1_500_000
    assert count("10_000") == 10_000
    assert count("1.001k") == 1001 and count("0.000001B") == 1000  # exact decimals, not floats
    with pytest.raises(argparse.ArgumentTypeError, match="1000.1 tokens, not a whole number"):
        count("1.0001k")
    for bad in ("-5", "nan", "12q"):
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)


def test_errors_are_one_line(tmp_path):
    r = run("prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "ds"), "--no-progress")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file or directory" in r.stderr
    r = run("data", "info", str(tmp_path))
    assert r.returncode == 2 and "not a prepared dataset" in r.stderr and r.stderr.strip().count("\n") == 0
    r = run("train", "--recipe", "smoke", "--optim.wd=3")
    assert r.returncode == 2 and "unknown config key 'optim.wd'" in r.stderr and r.stderr.count("\n") == 1


def _one_line(r, *needles):
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "usage:" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_usage_errors_are_one_line(tmp_path):
    _one_line(run("prepare", "--train-tokens", "-5", "--out", str(tmp_path / "ds")), "--train-tokens", "'-5'")
    _one_line(run("prepare", "--train-tokens", "1.0001k", "--out", str(tmp_path / "ds")), "not a whole number")
    # "-5k" (a suffix, no "=") is a value to refuse, not a flag argparse does not know
    _one_line(run("prepare", "--train-tokens", "-5k", "--out", str(tmp_path / "ds")), "not a non-negative token count: '-5k'")
    _one_line(run("prepare", "--val-tokens", "-1.5M", "--out", str(tmp_path / "ds")), "'-1.5M'")
    assert not (tmp_path / "ds").exists()


def test_no_test_split_reports_val_only(tmp_path):
    """--test-tokens 0 (the reference's own data has only train + val) is allowed with a note;
    a run on it prints '-' for test and says why, never nan."""
    r = run("prepare", "--tokenizer", "bpe:300", "--train-tokens", "6k", "--val-tokens", "2k", "--test-tokens", "0",
            "--out", str(tmp_path / "ds"), "--no-progress")
    assert r.returncode == 0 and "no test split" in r.stderr, r.stderr
    r = run("train", "--recipe", "smoke", "--data", str(tmp_path / "ds"), "--run-dir", str(tmp_path / "run"),
            "--train.max_steps=2", "--train.num_threads=1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout and "(no test losses: the dataset has no test split" in r.stdout, r.stdout
    final = r.stdout.splitlines()[1].split()
    assert final[0] == "final" and final[-2:] == ["-", "-"]


def test_missing_source_is_the_error_even_when_the_default_out_is_taken(tmp_path):
    taken = tmp_path / "data" / "builtin"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("someone else's files")
    r = run("prepare", "--source", str(tmp_path / "nonexistent"), cwd=tmp_path)
    _one_line(r, "nonexistent: no such file or directory")
    assert (taken / "notes.txt").read_text() == "someone else's files"


def test_paths_that_are_files_are_named(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    _one_line(run("train", "--recipe", "smoke", "--run-dir", str(f)), f"--run-dir {f}: exists and is not a directory")
    _one_line(run("ensemble", "--recipe", "smoke", "--run-dir", str(f), "--data", str(tmp_path)), "not a directory")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    _one_line(run("report", str(tmp_path / "r"), "--out", str(f)), f"--out {f}: exists and is not a directory")
    # a path through a file: the OS error in one line
    _one_line(run("train", "--recipe", "smoke", "--run-dir", str(f / "sub")), "Not a directory")
    _one_line(run("report", str(tmp_path / "r"), "--out", str(f / "x")), "Not a directory")
    assert f.read_text() == "keep me"


def test_a_device_that_is_not_here_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    _one_line(run("train", "--recipe", "smoke", "--run-dir", str(tmp_path / "r"), "--train.device=cuda"),
              "train.device=cuda: no CUDA device is available here")


def test_eval_max_tokens_zero_is_refused(tmp_path):
    _one_line(run("eval", str(tmp_path), "--max-tokens", "0"), "--max-tokens: must be -1 (the whole split) or > 0")


def test_prepare_and_info_from_the_cli(tmp_path):
    out = tmp_path / "ds"
    r = run("prepare", "--tokenizer", "gpt2", "--train-tokens", "5k", "--val-tokens", "1k", "--test-tokens", "1k",
            "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "train 5,000 tokens" in r.stdout
    r = run("data", "info", str(out))
    assert r.returncode == 0 and "verified" in r.stdout and "train.bin" in r.stdout


def test_quiet_still_prints_the_results_table(bpe_ds, tmp_path):
    r = run("train", "--recipe", "smoke", "--data", str(bpe_ds), "--run-dir", str(tmp_path / "q"), "--train.max_steps=2",
            "--eval.max_tokens=512", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "(* = best on val)" in r.stdout and "val loss" in r.stdout
    assert not any(line.startswith("step ") for line in r.stdout.splitlines())  # the per-step lines stay hidden


def test_cpu_track_no_train_refuses_parts_that_train(tmp_path):
    """`bench cpu-track --no-train` trains nothing: with parts that would train entries (or time the
    throughput) it stops before anything is prepared or written."""
    r = run("bench", "cpu-track", "--no-train", "--parts", "baseline", "single", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path / "r.json"))
    _one_line(r, "--no-train trains nothing: --parts baseline single")
    assert not any(tmp_path.iterdir())


def _refused(capsys, *args) -> str:
    """main's exit code 2 and its one line on stderr (a usage error exits through argparse)."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args, says", [
    (["sample", "RUN", "--temperature", "nan"], "--temperature: must be a finite number >= 0 (0 = greedy), got nan"),
    (["sample", "RUN", "--temperature", "-1"], "--temperature: must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["sample", "RUN", "--max-new-tokens", "-3"], "--max-new-tokens: must be >= 1, got -3"),
    (["sample", "RUN", "--top-k", "-5"], "--top-k: must be >= 0 (0 = every token), got -5"),
    (["sample", "RUN", "--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    (["sample", "RUN", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["eval", "RUN", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["sweep", "--data", "D", "--out", "O", "--budgets", "1", "nan"], "argument --budgets: 'nan' is not a positive multiple"),
    (["sweep", "--data", "D", "--out", "O", "--budgets", "0"], "argument --budgets: '0' is not a positive multiple"),
    (["bench", "cpu-track", "--budgets", "inf"], "argument --budgets: 'inf' is not a positive multiple"),
    (["efficiency", "--loss", "nan"], "--loss nan: not a finite number"),
    (["plan", "smoke", "--step-s", "nan"], "--step-s: must be a finite number > 0, got nan"),
])
def test_a_value_that_makes_no_sense_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, args, says):
    """Checked before the run, dataset or curve is even looked at (RUN, D and O do not exist)."""
    monkeypatch.chdir(tmp_path)
    assert says in _refused(capsys, *args)


def test_a_device_name_that_is_not_known_is_refused():
    from slowrun.distributed import DeviceError, resolve_device

    with pytest.raises(DeviceError, match="device 'tpu': one of auto, cpu, cuda"):
        resolve_device("tpu")
