"""Written files and directories get the modes the umask gives (mkstemp/mkdtemp alone make
0600/0700, so nobody else on a shared machine could read a dataset or serve a report)."""

import os
import stat

import pytest

from slowrun.storage import atomic_directory, atomic_write_text


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    atomic_write_text(tmp_path / "result.json", "{}")
    assert _mode(tmp_path / "result.json") == file_mode
    with atomic_directory(tmp_path / "dataset") as d:
        atomic_write_text(d / "manifest.json", "{}")
    assert _mode(tmp_path / "dataset") == dir_mode and _mode(tmp_path / "dataset" / "manifest.json") == file_mode


def test_weights_and_checkpoints_respect_the_umask(tmp_path, umask):
    """safetensors' save_file makes 0600 whatever the umask; written weights get the umask's mode."""
    import torch

    from slowrun.checkpoint import save_checkpoint, save_weights
    from slowrun.config import build_config

    umask(0o022)
    cfg = build_config("smoke", {})
    state = {"w": torch.ones(2, 2)}
    save_weights(tmp_path / "run" / "model.safetensors", state, cfg)
    save_checkpoint(tmp_path / "run", 1, cfg, state, [{"state": {}, "param_groups": []}], extra={})
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "optim.safetensors" for p in files) and any(p.parent.name.startswith("step_") for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}


def test_a_report_is_readable_by_others(tmp_path, umask):
    from slowrun.report import build_report

    umask(0o022)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 5.0, "epoch": 0.1}\n')
    page = build_report([str(tmp_path / "run")], tmp_path / "rep")
    assert _mode(page) == 0o644
