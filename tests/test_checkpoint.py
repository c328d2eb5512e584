"""Checkpoints, exact resume after SIGKILL, corrupt checkpoints, pickles, and torchrun."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from slowrun.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, read_weights
from slowrun.jobs import torchrun
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


def _interrupted_at_step_14(bpe_ds, tmp_path, monkeypatch):
    """The reference run's config trained in tmp_path/run until it is stopped during step 14
    (checkpoints at 6, 9 and 12); returns the run directory."""
    from slowrun.config import build_config, parse_overrides
    from slowrun.loader import TrainLoader

    run = tmp_path / "run"
    over = parse_overrides([a for a in ARGS if a.startswith("--") and "=" in a])
    cfg = build_config("smoke", {**over, "data.path": str(bpe_ds)})
    real, calls = TrainLoader.next_batch, {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(TrainLoader, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, echo=False)
    monkeypatch.setattr(TrainLoader, "next_batch", real)
    return run


def test_truncated_checkpoint_is_refused_and_resume_falls_back(bpe_ds, reference_run, tmp_path, monkeypatch):
    run = _interrupted_at_step_14(bpe_ds, tmp_path, monkeypatch)
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


def test_what_a_kill_mid_checkpoint_leaves_is_cleared_by_the_resume(bpe_ds, reference_run, tmp_path, monkeypatch):
    """A run killed while writing a checkpoint leaves its build directory in checkpoints/
    (`.step_N.XXXXXXXX.partial`); one killed between a replace's two renames leaves the old copy
    (`.step_N.old-PID`) and no step_N. The resume removes the first and puts the second back
    (then resumes from it, repeating the reference run)."""
    run = _interrupted_at_step_14(bpe_ds, tmp_path, monkeypatch)
    ck = run / "checkpoints"
    partial = ck / ".step_0000015.k3y9a_0z.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    (ck / "step_0000012").rename(ck / ".step_0000012.old-4242")
    train(None, run, resume=True, echo=False)
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(".")) == []
    log = (run / "log.txt").read_text()
    assert "resumed from" in log and "step_0000012" in log
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
              "--eval.max_tokens=512", "--eval.every_steps=3", "--optim.ema_decay=0.9", "--quiet", "--train.num_threads=1"]
    one = subprocess.run([sys.executable, "-m", "slowrun", "train", "--run-dir", str(tmp_path / "one"), *common],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*torchrun(2), "-m", "slowrun", "train", "--run-dir", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-12000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-4), step
    ra = json.loads((tmp_path / "one" / "result.json").read_text())
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    # periodic and final evaluations are sharded over the two ranks: every variant's losses agree
    assert rb["world_size"] == 2 and set(rb["variants"]) == set(ra["variants"]) == {"final", "ema"}
    for name, v in ra["variants"].items():
        for k in ("val_loss", "test_loss"):
            assert rb["variants"][name][k] == pytest.approx(v[k], abs=2e-4), (name, k)
    evals = [[json.loads(line)["val_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "eval"] for d in ("one", "two")]
    assert len(evals[0]) == len(evals[1]) >= 1 and evals[1] == pytest.approx(evals[0], abs=2e-4)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_shutdown_frees_the_process_group_after_the_optimizers_are_built(tmp_path):
    """The optimizers' construction imports torch._dynamo and with it torch.distributed.nn, whose
    default arguments would hold the process group: after shutdown gloo's threads would run into
    the interpreter's exit, where one of them can abort the rank. They must be gone."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, torch\n"
        "from slowrun import distributed\n"
        "from slowrun.config import ModelConfig, OptimConfig\n"
        "from slowrun.gpt import GPT\n"
        "from slowrun.optim import build_optimizers\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "alone = threads()\n"
        "env = distributed.init('cpu')\n"
        "assert threads() > alone\n"
        "build_optimizers(GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, seq_len=16)), OptimConfig())\n"
        "distributed.barrier(env)\n"
        "distributed.shutdown(env)\n"
        f"open(os.path.join({str(tmp_path)!r}, 'threads' + os.environ['RANK']), 'w').write(f'{{alone}} {{threads()}}')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*torchrun(2), str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-12000:]
    counts = [(tmp_path / f"threads{rank}").read_text().split() for rank in (0, 1)]
    assert all(after == alone for alone, after in counts), counts


def test_sharded_optimizer_over_two_and_three_gloo_ranks_equals_one_process_and_resumes_anywhere(bpe_ds, tmp_path):
    """train.shard_optimizer: each rank steps its own tensors. At one global batch, 2 and 3
    sharded ranks give one unsharded process's losses; their gathered checkpoint holds its
    optimizer state; a 2-rank checkpoint resumes on 1 and on 3 ranks with the same next steps."""
    common = ["--recipe", "smoke", "--data", str(bpe_ds), "--train.max_steps=4", "--train.batch_tokens=3072",
              "--train.checkpoint_every=2", "--train.keep_checkpoints=3", "--optim.grad_clip=0.5", "--optim.normuon=true",
              "--train.micro_batch_tokens=512", "--eval.max_tokens=512", "--eval.test=false", "--quiet", "--train.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(ranks: int, *args: str) -> None:
        cmd = [sys.executable, "-m", "slowrun", "train"]
        if ranks > 1:
            cmd = [*torchrun(ranks), "-m", "slowrun", "train"]
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-12000:]

    run(1, "--run-dir", str(tmp_path / "one"), *common)
    for ranks in (2, 3):
        run(ranks, "--run-dir", str(tmp_path / f"r{ranks}"), *common, "--train.shard_optimizer=true")
    a = losses(tmp_path / "one")
    # rank 0 logs its share; some buckets were reduced while backward still ran
    line = next(x for x in (tmp_path / "r2" / "log.txt").read_text().splitlines() if "sharded over 2 rank(s)" in x)
    assert int(re.search(r"(\d+) reduced during the last backward", line).group(1)) >= 1, line
    for ranks in (2, 3):
        b = losses(tmp_path / f"r{ranks}")
        assert sorted(b) == [1, 2, 3, 4] and all(b[s] == pytest.approx(a[s], abs=2e-4) for s in a), ranks
    # the checkpoint holds every tensor's optimizer state, gathered from both ranks
    ca, cb = (load_checkpoint(list_checkpoints(tmp_path / d)[0]) for d in ("one", "r2"))
    assert ca.step == cb.step == 2
    for x, y in zip(ca.optimizer_states(2), cb.optimizer_states(2)):  # {param index: {name: value}} per optimizer
        assert sorted(x) == sorted(y) and len(x) > 0
        for k in x:
            for n, t in x[k].items():
                if hasattr(t, "shape"):
                    assert torch.allclose(t.float(), y[k][n].float(), atol=1e-4), (k, n)
    # the 2-rank run resumed from its step-2 checkpoint on 1 and on 3 ranks: the same steps 3 and 4
    ref = losses(tmp_path / "r2")
    for ranks in (1, 3):
        again = tmp_path / f"again{ranks}"
        shutil.copytree(tmp_path / "r2", again)
        for ck in list_checkpoints(again)[1:]:
            shutil.rmtree(ck)
        (again / "result.json").unlink()
        run(ranks, "--resume", str(again), "--quiet")
        got = losses(again)
        assert all(got[s] == pytest.approx(ref[s], abs=2e-4) for s in (3, 4)), ranks
        assert "resumed from" in (again / "log.txt").read_text()


def test_owners_balance_the_elements():
    from slowrun.distributed import assign_owners

    sizes = [1000, 10, 400, 400, 200, 5, 5]
    owner = assign_owners(sizes, 2)
    load = [sum(s for s, r in zip(sizes, owner) if r == k) for k in range(2)]
    assert owner == assign_owners(sizes, 2) and load == [1010, 1010] and assign_owners(sizes, 1) == [0] * 7


# ---------------------------------------------------------------------------------------
# tampered weights, state and config; concurrent resume; interrupts


@pytest.fixture(scope="module")
def short_run(bpe_ds, tmp_path_factory):
    """6 steps, checkpoints at 2, 4 and 6, finished."""
    from tests.conftest import smoke_config

    run = tmp_path_factory.mktemp("short") / "run"
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 6, "train.checkpoint_every": 2, "train.keep_checkpoints": 3,
                                  "eval.max_tokens": 512})
    train(cfg, run, echo=False)
    return run


def _copy(run, tmp_path, unfinished=True):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    if unfinished:
        (dst / "result.json").unlink()  # as if stopped after its last checkpoint
    return dst


def _flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_flipped_byte_in_weights_is_refused_everywhere(short_run, bpe_ds, tmp_path):
    from slowrun.checkpoint import load_model
    from tests.conftest import smoke_config

    run = _copy(short_run, tmp_path, unfinished=False)
    for f in run.rglob("*.safetensors"):
        _flip_byte(f)
    for ref in (run, list_checkpoints(run)[-1], run / "ema.safetensors"):
        r = subprocess.run([sys.executable, "-m", "slowrun", "eval", str(ref)], capture_output=True, text=True)
        _one_line_error(r, "corrupt", "sha256")
    r = subprocess.run([sys.executable, "-m", "slowrun", "sample", str(run), "--max-new-tokens", "2"],
                       capture_output=True, text=True)
    _one_line_error(r, "corrupt")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(run)
    student = smoke_config(bpe_ds, **{"train.max_steps": 1, "distill.teacher": str(run)})
    with pytest.raises(CheckpointError, match="corrupt"):
        train(student, tmp_path / "student", echo=False)
    assert not (tmp_path / "student" / "config.toml").exists()  # a failed start leaves the directory reusable


def test_weights_without_their_sidecar_are_refused(short_run, tmp_path):
    run = _copy(short_run, tmp_path, unfinished=False)
    state, _, _ = read_weights(run / "model.safetensors")  # intact: loads
    assert state
    (run / "model.safetensors.sha256").unlink()
    with pytest.raises(CheckpointError, match="cannot be verified"):
        read_weights(run / "model.safetensors")


def test_edited_state_json_is_refused_and_resume_falls_back(short_run, tmp_path):
    run = _copy(short_run, tmp_path)
    newest = list_checkpoints(run)[-1]
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] == 6
    state["step"] = 5  # still valid JSON, still the right files
    (newest / "state.json").write_text(json.dumps(state, indent=1))
    with pytest.raises(CheckpointError, match="edited or corrupt"):
        load_checkpoint(newest)
    train(None, run, resume=True, echo=False)
    log = (run / "log.txt").read_text()
    assert "warning: skipping checkpoint" in log and "resumed from" in log and "step_0000004 at step 4" in log
    assert sorted(losses(run)) == list(range(1, 7))


def test_resume_refuses_to_restart_when_no_checkpoint_verifies(short_run, tmp_path):
    from slowrun.train import TrainingError

    run = _copy(short_run, tmp_path)
    for ck in list_checkpoints(run):
        loader = json.loads((ck / "state.json").read_text())
        loader["extra"]["loader"]["pos"] += 1
        (ck / "state.json").write_text(json.dumps(loader))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="none of its checkpoints verifies"):
        train(None, run, resume=True, echo=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_edited_config_is_refused_unless_forced(short_run, tmp_path):
    run = _copy(short_run, tmp_path)
    toml = (run / "config.toml").read_text()
    assert "matrix_lr = 0.02\n" in toml
    (run / "config.toml").write_text(toml.replace("matrix_lr = 0.02\n", "matrix_lr = 0.03\n"))
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--resume", str(run)], capture_output=True, text=True)
    _one_line_error(r, "optim.matrix_lr 0.02 -> 0.03", "--force")
    assert not (run / "result.json").exists()
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--resume", str(run), "--force", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--force: continuing with the edited config.toml (optim.matrix_lr" in (run / "log.txt").read_text()
    (run / "config.toml").write_text("[optim\nmatrix_lr = ")  # corrupt TOML: one line, no traceback
    (run / "result.json").unlink()
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--resume", str(run)], capture_output=True, text=True)
    _one_line_error(r, "not valid TOML")


def test_a_skipped_checkpoint_is_said_on_stderr_even_when_quiet(short_run, tmp_path):
    run = _copy(short_run, tmp_path)
    newest = list_checkpoints(run)[-1]
    state = json.loads((newest / "state.json").read_text())
    state["step"] += 1
    (newest / "state.json").write_text(json.dumps(state))
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--resume", str(run), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"warning: skipping checkpoint: {newest / 'state.json'}: edited or corrupt" in r.stderr


def test_forced_edit_that_changes_a_shape_is_one_line(short_run, tmp_path):
    run = _copy(short_run, tmp_path)
    toml = (run / "config.toml").read_text()
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (run / "config.toml").write_text(_set_width(toml))
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--resume", str(run), "--force"], capture_output=True, text=True)
    _one_line_error(r, "does not fit the model of config.toml", "undo the edit")
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "config.toml"}
    assert after == {k: v for k, v in before.items() if k != "config.toml"}  # nothing else touched


def _set_width(toml: str) -> str:
    import re

    width = int(re.search(r"^n_embd = (\d+)$", toml, re.M).group(1))
    return re.sub(r"^n_embd = \d+$", f"n_embd = {2 * width}", toml, count=1, flags=re.M)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_and_prints_the_resume_command(bpe_ds, tmp_path, capsys, sig, code):
    from slowrun import cli

    run = tmp_path / "run"
    p = slowrun("train", "--data", str(bpe_ds), "--run-dir", str(run), "--recipe", "smoke", "--train.max_steps=30",
                "--eval.max_tokens=512", "--eval.test=false", "--quiet")
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and max(losses(run) or {0: 0}) >= 3):
        time.sleep(0.02)
    # a second writer of the same run is refused while the first holds it
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run directory {run} is in use by another slowrun process (pid {p.pid})" in err[0]
    os.kill(p.pid, sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == code, err
    line = err.strip().splitlines()[-1]
    assert f"resume with: slowrun train --resume {run}" in line and "stopped at step" in line
    stopped = int(line.split("stopped at step ")[1].split("/")[0])
    assert [c.name for c in list_checkpoints(run)] == [f"step_{stopped:07d}"] and stopped < 30
    assert max(losses(run)) == stopped
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--resume", str(run), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(losses(run)) == list(range(1, 31)) and (run / "result.json").is_file()
    assert f"at step {stopped}" in (run / "log.txt").read_text()


def test_disk_full_while_checkpointing_is_one_error_and_keeps_the_last_checkpoint(bpe_ds, tmp_path, monkeypatch):
    import slowrun.checkpoint as checkpoint
    from safetensors import SafetensorError
    from tests.conftest import smoke_config

    real, calls = checkpoint.save_file, {"n": 0}

    def full_disk(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the model file of the second checkpoint
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="could not write .*model.safetensors: .*No space left on device"):
        train(smoke_config(bpe_ds, **{"train.max_steps": 6, "train.checkpoint_every": 2}), run, echo=False)
    assert [c.name for c in list_checkpoints(run)] == ["step_0000002"]
    assert load_checkpoint(list_checkpoints(run)[0]).step == 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial directory


def test_corrupt_result_json_on_resume_is_one_line(short_run, tmp_path, capsys):
    from slowrun import cli

    run = _copy(short_run, tmp_path, unfinished=False)
    (run / "result.json").write_text('{"variants": ')
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "result.json: corrupt" in err[0]
    assert (run / "result.json").read_text() == '{"variants": '  # left for the user to look at


def test_a_rank_keeps_only_its_own_optimizer_state():
    from slowrun.distributed import DistEnv, ShardedStep

    params = [torch.nn.Parameter(torch.randn(n, 4)) for n in (8, 4, 4, 2)]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    shard = ShardedStep(params, DistEnv(rank=1, world_size=2))
    shard.keep_own_state([opt])
    kept = [i for i, p in enumerate(params) if p in opt.state]
    assert kept == [i for i, r in enumerate(shard.owner) if r == 1] == [1, 2]  # 32 of the 72 elements; rank 0 has the 8x4


def test_a_field_added_since_the_checkpoint_is_no_change():
    """A checkpoint written before a config field existed lacks it; the field at its default
    (the behaviour the run had) is no change, another value is one, and a key this version does
    not know is named as absent (measured: a run of the ablation stopped before
    data.curriculum_blocks existed was refused on resume, `'(absent)' -> 0`)."""
    from slowrun.config import build_config, config_to_dict
    from slowrun.train import config_changes

    new = config_to_dict(build_config("smoke"))
    old = json.loads(json.dumps(new))
    del old["data"]["curriculum_blocks"]
    assert config_changes(old, new) == []
    new["data"]["curriculum_blocks"] = 4
    assert config_changes(old, new) == ["data.curriculum_blocks 0 -> 4"]
    old["data"]["retired_knob"] = 1
    assert config_changes(old, new)[-1] == "data.retired_knob 1 -> '(absent)'"


def test_local_clipping_clips_each_ranks_gradient_before_the_average(bpe_ds, tmp_path):
    """optim.clip_scope = local (the reference's unlimited trainer): every rank's gradient is
    clipped to grad_clip before the average, so the averaged gradient's norm never exceeds it;
    global clipping measures the average's (larger) norm and clips that. One process: the same."""
    common = ["--recipe", "smoke", "--data", str(bpe_ds), "--train.max_steps=3", "--train.batch_tokens=2048",
              "--eval.max_tokens=512", "--quiet", "--train.num_threads=1", "--optim.grad_clip=0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    norms = {}
    for scope in ("local", "global"):
        r = subprocess.run([*torchrun(2), "-m", "slowrun", "train", "--run-dir", str(tmp_path / scope), *common,
                            f"--optim.clip_scope={scope}"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-12000:]
        norms[scope] = [json.loads(l)["grad_norm"] for l in (tmp_path / scope / "metrics.jsonl").read_text().splitlines()
                        if json.loads(l)["kind"] == "train"]
    assert len(norms["local"]) == 3 and all(n <= 0.05 * (1 + 1e-5) for n in norms["local"])
    assert all(n > 0.05 for n in norms["global"])  # the average before clipping
    one = {}
    for scope in ("local", "global"):
        r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--run-dir", str(tmp_path / f"one-{scope}"), *common,
                            f"--optim.clip_scope={scope}"], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        one[scope] = losses(tmp_path / f"one-{scope}")
    assert one["local"] == one["global"]
