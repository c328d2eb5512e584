"""Checkpoints, exact resume after SIGKILL, corrupt checkpoints, pickles, and torchrun."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from slowrun.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, read_weights
from slowrun.train import train
from tests.test_train import losses

ARGS = ["--recipe", "smoke", "--train.max_steps=40", "--train.checkpoint_every=3", "--train.keep_checkpoints=3",
        "--optim.ema_decay=0.9", "--optim.swa_epochs=1", "--train.epochs=2", "--eval.max_tokens=1024", "--quiet"]


def slowrun(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "slowrun", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.fixture(scope="module")
def reference_run(bpe_ds, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    p = slowrun("train", "--data", str(bpe_ds), "--run-dir", str(run), *ARGS)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return run


def test_sigkill_mid_epoch_then_resume_repeats_the_run(bpe_ds, reference_run, tmp_path):
    run = tmp_path / "run"
    p = slowrun("train", "--data", str(bpe_ds), "--run-dir", str(run), *ARGS)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a few checkpoints exist, mid-epoch (an epoch is ~39 steps)
        if len(list_checkpoints(run)) >= 2 and max(losses(run) or {0: 0}) >= 8:
            break
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "result.json").exists()
    killed_at = max(losses(run))
    assert killed_at < 40
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--resume", str(run), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref, got = losses(reference_run), losses(run)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert got[step] == pytest.approx(ref[step], abs=1e-6), step
    a = json.loads((reference_run / "result.json").read_text())
    b = json.loads((run / "result.json").read_text())
    for name, v in a["variants"].items():
        assert b["variants"][name]["val_loss"] == pytest.approx(v["val_loss"], abs=1e-6)
    assert "resumed from" in (run / "log.txt").read_text()


def test_truncated_checkpoint_is_refused_and_resume_falls_back(bpe_ds, reference_run, tmp_path, monkeypatch):
    from slowrun.config import build_config, parse_overrides
    from slowrun.loader import TrainLoader

    run = tmp_path / "run"
    over = parse_overrides([a for a in ARGS if a.startswith("--") and "=" in a])
    cfg = build_config("smoke", {**over, "data.path": str(bpe_ds)})
    real, calls = TrainLoader.next_batch, {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt  # as if killed during step 14: checkpoints at 6, 9, 12
        return real(self)

    monkeypatch.setattr(TrainLoader, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, echo=False)
    monkeypatch.setattr(TrainLoader, "next_batch", real)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_0000012"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(newest)
    train(None, run, resume=True, echo=False)  # warns, falls back to step 9, repeats the reference
    log = (run / "log.txt").read_text()
    assert "warning: skipping checkpoint" in log and "resumed from" in log and "step_0000009" in log
    ref, got = losses(reference_run), losses(run)
    for step in range(1, 41):
        assert got[step] == pytest.approx(ref[step], abs=1e-6), step


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_offered_as_a_checkpoint_is_never_executed(tmp_path, reference_run):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": _Exploit(marker)}))
    with pytest.raises(CheckpointError, match="never pickles"):
        read_weights(evil)
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_weights(disguised)
    ck = tmp_path / "checkpoints" / "step_0000001"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(evil.read_bytes())
    (ck / "state.json").write_text(json.dumps({"format": "slowrun-checkpoint/1", "step": 1, "files": {}}))
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)
    r = subprocess.run([sys.executable, "-m", "slowrun", "eval", str(evil)], capture_output=True, text=True)
    assert r.returncode == 2 and "never pickles" in r.stderr
    assert not marker.exists()


def test_two_gloo_processes_equal_one(bpe_ds, tmp_path):
    common = ["--recipe", "smoke", "--data", str(bpe_ds), "--train.max_steps=6", "--train.batch_tokens=2048",
              "--eval.max_tokens=512", "--eval.test=false", "--quiet", "--train.num_threads=1"]
    one = subprocess.run([sys.executable, "-m", "slowrun", "train", "--run-dir", str(tmp_path / "one"), *common],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "slowrun", "train", "--run-dir", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-4), step
    ra = json.loads((tmp_path / "one" / "result.json").read_text())
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    assert rb["world_size"] == 2 and rb["val_loss"] == pytest.approx(ra["val_loss"], abs=2e-4)
