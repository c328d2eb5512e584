"""The results ledger: keys, lookup, refusal of foreign datasets, corrupt lines, concurrent writers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slowrun.ledger import FORMAT, Ledger, LedgerError, config_key

DS = {"tokenizer": "sha256:t", "val": "v", "test": "t", "train": "tr", "train_tokens": 100}


def entry(key="k1", **ds):
    return {"format": FORMAT, "key": key, "dataset": {**DS, **ds}, "variants": {"final": {"val_loss": 5.0}},
            "best": "final"}


def test_config_key_ignores_paths_threads_and_logging_only():
    cfg = {"model": {"n_layer": 2}, "train": {"seed": 0, "num_threads": 1, "progress": True}, "data": {"path": "/a"}}
    same = {"model": {"n_layer": 2}, "train": {"seed": 0, "num_threads": 2, "progress": False}, "data": {"path": "/b/c"}}
    assert config_key(cfg) == config_key(same)
    assert config_key(cfg) != config_key({**cfg, "train": {**cfg["train"], "seed": 1}})
    assert config_key(cfg) != config_key({**cfg, "model": {"n_layer": 3}})


def test_config_key_survives_a_new_config_field_and_notices_a_changed_default():
    from slowrun.config import build_config, config_to_dict

    today = config_to_dict(build_config("nanochat", {"model.vocab_size": 300}))
    older = {sec: dict(v) for sec, v in today.items()}
    del older["optim"]["lr_scale"], older["model"]["init"]  # results written before these fields existed
    older["model"]["init"] = "nanochat"  # ...except a non-default value, which any version records
    assert config_key(older) == config_key(today)
    changed = {sec: dict(v) for sec, v in today.items()}
    changed["optim"]["lr_scale"] = 0.5
    assert config_key(changed) != config_key(today)
    unknown = {sec: dict(v) for sec, v in today.items()}
    unknown["model"]["a_future_field"] = 1  # a setting this version does not know is never taken for none
    assert config_key(unknown) != config_key(today)


def test_stored_keys_are_recomputed_on_open(tmp_path):
    from slowrun.config import build_config, config_to_dict

    cfg = config_to_dict(build_config("smoke", {"model.vocab_size": 300}))
    Ledger(tmp_path / "l.jsonl").append({**entry("stale-key-of-an-older-version"), "config": cfg})
    assert Ledger.open(tmp_path / "l.jsonl").find(config_key(cfg), DS) is not None


def test_append_and_find_round_trip(tmp_path):
    led = Ledger.open(tmp_path / "l.jsonl")
    assert led.entries == []
    led.append(entry())
    led.append(entry("k2"))
    again = Ledger.open(tmp_path / "l.jsonl")
    assert [e["key"] for e in again.entries] == ["k1", "k2"] and again.entries[1]["_line"] == 2
    assert again.find("k1", DS)["variants"]["final"]["val_loss"] == 5.0
    assert again.find("k3", DS) is None
    assert again.find("k1", {**DS, "train": "other", "train_tokens": 200}) is None  # another budget: silently no match


def test_paths_inside_the_working_directory_are_written_relative(tmp_path, monkeypatch):
    """The committed ledger named the directories of the machine that ran each point
    (config.data.path, made absolute by the trainer); a line is now written with the paths
    inside the working directory relative to it, and an old line's absolute paths read as they were."""
    from slowrun.config import build_config, config_to_dict

    monkeypatch.chdir(tmp_path)
    cfg = config_to_dict(build_config("smoke", {"model.vocab_size": 300, "data.path": str(tmp_path / "data" / "1x"),
                                                "distill.teacher": "/elsewhere/teacher"}))
    new = {**entry(config_key(cfg)), "config": cfg, "run_dir": str(tmp_path / "runs" / "1x" / "a"), "tag": {"root": str(tmp_path)}}
    old = {**entry(config_key(cfg), val="old"), "config": cfg, "run_dir": str(tmp_path / "runs" / "old")}
    (tmp_path / "l.jsonl").write_text(json.dumps(old) + "\n")  # a line as written before: absolute paths
    Ledger.open(tmp_path / "l.jsonl").append(new)
    was, now = Ledger.open(tmp_path / "l.jsonl").entries
    assert now["config"]["data"]["path"] == "data/1x" and now["run_dir"] == "runs/1x/a" and now["tag"]["root"] == "."
    assert now["config"]["distill"]["teacher"] == "/elsewhere/teacher"  # outside the working directory: as it was
    assert was["config"]["data"]["path"] == str(tmp_path / "data" / "1x") and was["run_dir"] == str(tmp_path / "runs" / "old")
    assert was["key"] == now["key"] == config_key(cfg)  # no path is part of a key
    assert '"/' not in (tmp_path / "l.jsonl").read_text().splitlines()[1].replace('"/elsewhere/teacher"', "")
    # several teachers (an ensemble): each path inside the working directory made relative
    from slowrun.ledger import portable_paths
    both = f"{tmp_path / 'runs' / 'm0'},{tmp_path / 'runs' / 'm1'}"
    assert portable_paths({"teacher": both}, tmp_path) == {"teacher": "runs/m0,runs/m1"}
    assert portable_paths("a,b", tmp_path) == "a,b" and portable_paths("/x/a,b", tmp_path) == "/x/a,b"


def test_foreign_dataset_is_ignored_with_one_line(tmp_path):
    led = Ledger(tmp_path / "l.jsonl")
    led.append(entry(val="other-val"))
    said = []
    assert Ledger.open(led.path).find("k1", DS, warn=said.append) is None
    assert len(said) == 1 and "l.jsonl:1" in said[0] and "differs in val" in said[0]


def test_corrupt_line_names_its_number(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps(entry()) + "\n" + '{"format": "slowrun-ledger/1", "key": \n')
    with pytest.raises(LedgerError, match=r"l.jsonl:2: corrupt, not valid JSON"):
        Ledger.open(p)
    p.write_text(json.dumps({"hello": 1}) + "\n")
    with pytest.raises(LedgerError, match=r"l.jsonl:1: field 'format' is missing"):
        Ledger.open(p)
    p.write_text(json.dumps({**entry(), "format": "slowrun-ledger/2"}) + "\n")
    with pytest.raises(LedgerError, match=r'l.jsonl:1: field .format. is a string \("slowrun-ledger/2"\), not "slowrun-ledger/1"'):
        Ledger.open(p)


def test_a_torn_last_line_does_not_swallow_the_next(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps(entry()) + "\n" + '{"format": "slowrun-led')  # a writer killed mid-line
    Ledger(p).append(entry("k2"))
    lines = p.read_text().splitlines()
    assert json.loads(lines[2])["key"] == "k2"  # the new line stands on its own; the torn one is reported by line
    with pytest.raises(LedgerError, match=":2: corrupt"):
        Ledger.open(p)


def test_concurrent_writers_lose_nothing(tmp_path):
    p = tmp_path / "l.jsonl"
    code = ("import sys; from slowrun.ledger import Ledger, FORMAT; led = Ledger(__import__('pathlib').Path(sys.argv[1]))\n"
            "for i in range(200): led.append({'format': FORMAT, 'key': sys.argv[2] + str(i), 'dataset': {}, "
            "'variants': {'final': {'val_loss': 5.0}}, 'best': 'final', 'pad': 'x' * 5000})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), w]) for w in ("a", "b", "c")]
    assert all(pr.wait() == 0 for pr in procs)
    keys = [e["key"] for e in Ledger.open(p).entries]
    assert len(keys) == 600 and set(keys) == {f"{w}{i}" for w in "abc" for i in range(200)}


def test_a_ledger_from_another_machine_merges_in_without_repeats(tmp_path):
    """Points run elsewhere (a lent GPU) come back as that machine's copy of the ledger: the
    entries this one lacks are appended once, in order; merging again adds nothing. `slowrun ledger
    merge`, and its older spelling `python -m slowrun.ledger merge`."""
    here = Ledger(tmp_path / "here.jsonl")
    here.append(entry("k1"))
    there = Ledger(tmp_path / "there.jsonl")
    for e in (entry("k1"), entry("k2"), entry("k1", val="other-val"), entry("k3")):
        there.append({**e, "device": "cuda"})
    r = subprocess.run([sys.executable, "-m", "slowrun.ledger", "merge", str(there.path), str(here.path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "merged 3 of 4 entries" in r.stdout, r.stderr
    merged = Ledger.open(here.path)
    assert [(e["key"], e["dataset"]["val"]) for e in merged.entries] == [("k1", "v"), ("k2", "v"), ("k1", "other-val"),
                                                                          ("k3", "v")]
    assert merged.entries[0].get("device") is None and merged.entries[1]["device"] == "cuda"
    assert Ledger.open(here.path).merge(Ledger.open(there.path)) == 0
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    r = subprocess.run([sys.executable, "-m", "slowrun", "ledger", "merge", str(tmp_path / "bad.jsonl"), str(here.path)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "bad.jsonl:1: corrupt, not valid JSON" in r.stderr
    # a mistyped source is not an empty ledger: nothing merged, the destination untouched
    before = here.path.read_bytes()
    r = subprocess.run([sys.executable, "-m", "slowrun", "ledger", "merge", str(tmp_path / "typo.jsonl"), str(here.path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"slowrun ledger: error: {tmp_path / 'typo.jsonl'}: no such ledger file"
    assert here.path.read_bytes() == before
    r = subprocess.run([sys.executable, "-m", "slowrun", "ledger", "merge", str(there.path), str(here.path), "--x=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "slowrun ledger: error: unrecognized arguments: --x=1"


def test_a_tree_exported_by_git_archive_still_names_its_commit(tmp_path):
    """Long runs go from a `git archive` snapshot (no .git): the repository's own COMMIT file and
    .gitattributes make the export carry the commit that the ledger's lines then record."""
    import shutil
    from pathlib import Path

    from slowrun.runlog import exported_commit

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "src" / "slowrun").mkdir(parents=True)
    shutil.copy(root / "src" / "slowrun" / "COMMIT", repo / "src" / "slowrun" / "COMMIT")
    shutil.copy(root / ".gitattributes", repo / ".gitattributes")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run([*git, "archive", "HEAD"], check=True, capture_output=True).stdout
    out.mkdir()
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    assert exported_commit(out / "src" / "slowrun" / "COMMIT") == head[:12]
    # in a checkout the file is not substituted, and a missing file names no commit either
    assert exported_commit(repo / "src" / "slowrun" / "COMMIT") == "unknown"
    assert exported_commit(tmp_path / "absent") == "unknown"


def _ledger_of_one_run(tmp_path, bpe_ds, steps, env):
    """tmp_path/ledger.jsonl holding one `smoke` run of `steps` steps, trained in tmp_path/first."""
    from slowrun.ledger import entry_from_result

    first = tmp_path / "first"
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--recipe", "smoke", "--data", str(bpe_ds), "--run-dir",
                        str(first), "--quiet", f"--train.max_steps={steps}", "--eval.max_tokens=2048",
                        "--train.num_threads=1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append(entry_from_result(json.loads((first / "result.json").read_text()), {"budget": 1.0}))
    return led


def test_rerun_trains_a_line_again_and_compares(tmp_path, bpe_ds):
    """`slowrun ledger rerun` (a CPU point trained again on a lent GPU) runs the line's
    own config: on this CPU the losses come out identical. Overrides that could change the
    result, an unknown key and another dataset are refused in one line before any training."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    led = _ledger_of_one_run(tmp_path, bpe_ds, 3, env)
    key = led.entries[0]["key"]

    def rerun(*args):
        return subprocess.run([sys.executable, "-m", "slowrun", "ledger", "rerun", str(led.path), *args],
                              capture_output=True, text=True, env=env)

    r = rerun(key[:8], "--data", str(bpe_ds), "--run-dir", str(tmp_path / "again"), "--out", str(tmp_path / "cmp.json"),
              "--train.num_threads=1", "--train.progress=false")
    assert r.returncode == 0, r.stderr
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["key"] == key and cmp["line"] == 1 and set(cmp["variants"]) == set(led.entries[0]["variants"])
    for splits in cmp["variants"].values():
        assert splits["val_loss"]["diff"] == 0.0 and splits["test_loss"]["diff"] == 0.0
        assert splits["val_loss"]["here"] == pytest.approx(5.0, abs=6)  # a real loss, not a placeholder
    assert f"{key} ({led.path}:1)" in r.stdout

    # by line number: keys follow the version's config_key, a line number does not
    r = rerun("@1", "--data", str(bpe_ds), "--run-dir", str(tmp_path / "again2"), "--train.num_threads=1")
    assert r.returncode == 0 and "(+0.0000)" in r.stdout and f"{key} ({led.path}:1)" in r.stdout, r.stderr
    r = rerun("@2", "--data", str(bpe_ds), "--run-dir", str(tmp_path / "x"))
    assert r.returncode != 0 and "no line 2 (it has 1 entries)" in r.stderr
    r = rerun(key, "--data", str(bpe_ds), "--run-dir", str(tmp_path / "x"), "--train.max_steps=4")
    assert r.returncode != 0 and "--train.max_steps=4: a rerun takes only settings that cannot change" in r.stderr
    r = rerun("ffff", "--data", str(bpe_ds), "--run-dir", str(tmp_path / "x"))
    assert r.returncode != 0 and "no config key starts with 'ffff'" in r.stderr
    other = tmp_path / "other"
    other_ds = _prepare_other(other)
    r = rerun(key, "--data", str(other_ds), "--run-dir", str(tmp_path / "x"))
    assert r.returncode != 0 and "is not the dataset of" in r.stderr
    assert not (tmp_path / "x").exists() and "Traceback" not in r.stderr


def test_sigterm_to_a_rerun_stops_its_run_and_the_same_command_resumes_it(tmp_path, bpe_ds):
    """`slowrun ledger rerun` trains through the job runner: SIGTERM to the command alone (not
    its process group, as `kill PID` or a batch system sends it) reaches the run, which
    checkpoints; the command exits 143 in one line, no training process outlives it, and the
    same command resumes the run to the line's losses exactly. (It ran the run as a plain child:
    the child was orphaned and trained on.)"""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    led = _ledger_of_one_run(tmp_path, bpe_ds, 150, env)  # ~8 s of steps: the signal comes at the first
    again = tmp_path / "again"
    cmd = [sys.executable, "-m", "slowrun", "ledger", "rerun", str(led.path), "@1", "--data", str(bpe_ds),
           "--run-dir", str(again), "--train.num_threads=1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        t0 = time.time()  # until the run has taken a step
        while "step " not in ((again / "log.txt").read_text() if (again / "log.txt").is_file() else ""):
            assert p.poll() is None and time.time() - t0 < 120, p.communicate()
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    last = err.strip().splitlines()[-1]  # after the bar
    assert "SIGTERM" in last and last.endswith("run the same command again to resume") and "Traceback" not in err
    assert not (again / "result.json").exists() and list((again / "checkpoints").glob("step_*"))

    def trainers():  # processes training in `again` (none may outlive the command)
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(again).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
        return found

    assert trainers() == []
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "(+0.0000)" in r.stdout and "(-" not in r.stdout and "(+0.0001" not in r.stdout, r.stdout


def _prepare_other(out):
    from slowrun.prepare import PrepareConfig, prepare

    return prepare(PrepareConfig(source="builtin", tokenizer="gpt2", train_tokens=10_000, val_tokens=4_000,
                                 test_tokens=4_000, out=str(out), progress=False))


@pytest.mark.parametrize("damage, message", [
    (lambda e: {k: v for k, v in e.items() if k != "variants"}, r"l.jsonl:2: field 'variants' is missing"),
    (lambda e: {**e, "best": "ema"}, r"l.jsonl:2: field 'best' is a string \(.ema.\), not one of the keys of 'variants' \(final\)"),
    (lambda e: {**e, "variants": {"final": {"val_loss": "5.2"}}},
     r"l.jsonl:2: field 'variants.final.val_loss' is a string \(.5.2.\), not a number"),
    (lambda e: {**e, "dataset": ["v"]}, r"l.jsonl:2: field 'dataset' is a list, not an object"),
])
def test_a_line_that_lacks_a_field_or_holds_the_wrong_kind_is_named(tmp_path, damage, message):
    """Valid JSON is not enough: a line is checked for every field a reader uses, at open."""
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps(entry("k0")) + "\n" + json.dumps(damage(entry())) + "\n")
    with pytest.raises(LedgerError, match=message):
        Ledger.open(p)


def test_a_sweep_names_the_bad_ledger_line_before_it_trains(tmp_path, bpe_ds):
    ledger = tmp_path / "l.jsonl"
    ledger.write_text(json.dumps({**entry(), "variants": {"final": {"val_loss": "5.2"}}}) + "\n")
    r = subprocess.run([sys.executable, "-m", "slowrun", "sweep", "--recipe", "smoke", "--data", str(bpe_ds), "--out",
                        str(tmp_path / "sw"), "--ledger", str(ledger), "--set", "train.max_steps=1", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "l.jsonl:1: field 'variants.final.val_loss' is a string" in r.stderr
    assert not (tmp_path / "sw" / "runs").exists()


def test_a_ledger_path_that_is_a_directory_is_refused_before_anything_trains(tmp_path, bpe_ds):
    with pytest.raises(LedgerError, match="--ledger .*: not a file"):
        Ledger.open(tmp_path)
    r = subprocess.run([sys.executable, "-m", "slowrun", "sweep", "--recipe", "smoke", "--data", str(bpe_ds), "--out",
                        str(tmp_path / "sw"), "--ledger", str(tmp_path), "--set", "train.max_steps=1", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a file" in r.stderr, r.stderr
    assert not (tmp_path / "sw" / "runs").exists()
