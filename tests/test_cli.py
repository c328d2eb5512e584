import subprocess
import sys

import pytest

from slowrun.cli import count, main


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "slowrun", *args], capture_output=True, text=True, **kw)


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("prepare", "data", "train", "eval", "sample", "ensemble", "sweep", "efficiency", "record", "report", "bench"):
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", ["prepare", "data", "train", "eval", "sample", "ensemble", "sweep", "efficiency",
                                 "record", "report", "bench"])
def test_each_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: slowrun" in capsys.readouterr().out


def test_token_counts():
    assert count("262144") == 262_144 and count("256k") == 256_000 and count("1.5M") == 1_500_000
    assert count("10_000") == 10_000


def test_errors_are_one_line(tmp_path):
    r = run("prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "ds"), "--no-progress")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file or directory" in r.stderr
    r = run("data", "info", str(tmp_path))
    assert r.returncode == 2 and "not a prepared dataset" in r.stderr and r.stderr.strip().count("\n") == 0
    r = run("train", "--recipe", "smoke", "--optim.wd=3")
    assert r.returncode == 2 and "did you mean optim.wd_embed" in r.stderr or "unknown config key 'optim.wd'" in r.stderr


def test_prepare_and_info_from_the_cli(tmp_path):
    out = tmp_path / "ds"
    r = run("prepare", "--tokenizer", "gpt2", "--train-tokens", "5k", "--val-tokens", "1k", "--test-tokens", "1k",
            "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "train 5,000 tokens" in r.stdout
    r = run("data", "info", str(out))
    assert r.returncode == 0 and "verified" in r.stdout and "train.bin" in r.stdout
