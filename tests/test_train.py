import json
import math
import subprocess
import sys

import pytest
import torch

from slowrun.checkpoint import list_checkpoints, load_checkpoint, load_model
from slowrun import SlowrunError
from slowrun.config import ConfigError, config_from_dict, tomllib
from slowrun.dataset import Dataset
from slowrun.evaluate import evaluate
from slowrun.gpt import GPT
from slowrun.loader import TrainLoader
from slowrun.train import TrainingError, train
from tests.conftest import smoke_config


def losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]  # a resumed run overwrites the steps it redoes
    return out


def test_cli_training_writes_a_complete_run(bpe_ds, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--run-dir", str(run), "--train.max_steps=12", "--optim.swa_epochs=1", "--train.epochs=0.7",
                        "--eval.every_steps=5",
                        "--train.compile_loss=true"],  # the built kernel, as every shipped recipe but smoke has it
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and "test loss" in r.stdout  # the closing table
    for name in ("config.toml", "log.txt", "metrics.jsonl", "result.json", "model.safetensors", "ema.safetensors"):
        assert (run / name).is_file(), name
    log = (run / "log.txt").read_text().splitlines()
    assert log[0].startswith("# slowrun: ") and log[1].startswith("# torch: ") and any("git_commit" in l for l in log[:8])
    assert any(l.startswith("step     12/12 | epoch") and "tok/s" in l and "ETA" in l for l in log)
    # the final evaluation says what it is doing, one line per pass, before the table
    assert "final evaluation 1/3: final weights on val and test" in r.stdout
    assert "final evaluation 3/3: the snapshots' parameter average" in r.stdout  # final, ema, swa_params
    result = json.loads((run / "result.json").read_text())
    assert set(result["variants"]) == {"final", "ema", "swa_params"}
    for v in result["variants"].values():
        assert {"val_loss", "val_bpb", "test_loss", "test_bpb"} <= set(v)
    for key in ("tokens_seen", "unique_tokens", "epochs", "wall_s", "tokens_per_s", "peak_rss_mb", "params"):
        assert key in result
    assert result["tokens_seen"] == 12 * 1024 and result["unique_tokens"] == 40_000
    cfg = config_from_dict(tomllib.loads((run / "config.toml").read_text()))
    assert cfg.model.vocab_size == 512 and cfg.data.path == str(bpe_ds)
    kinds = [json.loads(l)["kind"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 12 and kinds.count("eval") >= 2
    # the reported final loss is what the saved weights give
    model, wcfg, extra = load_model(run)
    ds = Dataset.open(bpe_ds)
    again = evaluate(model, ds.tokens("val"), wcfg.model.seq_len, ds.token_bytes)
    assert again.loss == pytest.approx(result["variants"]["final"]["val_loss"], rel=1e-5)
    assert extra["dataset"]["tokenizer"] == ds.fingerprint["tokenizer"]


def test_training_reduces_loss_and_beats_unigram(bpe_ds, tmp_path):
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 60, "optim.matrix_lr": 0.05, "optim.lr": 0.02})
    result = train(cfg, tmp_path / "run", echo=False)
    steps = losses(tmp_path / "run")
    assert steps[60] < steps[1] - 1.0
    ds = Dataset.open(bpe_ds)
    counts = torch.bincount(torch.from_numpy(ds.tokens("train").astype("int64")), minlength=ds.vocab_size).double() + 1
    p = counts / counts.sum()
    val = torch.from_numpy(ds.tokens("val").astype("int64"))
    unigram = -p.log()[val].mean().item()
    assert result["variants"]["final"]["val_loss"] < unigram


def test_train_gives_the_callers_thread_count_back(bpe_ds, tmp_path, monkeypatch):
    # train.num_threads is set for the run; an in-process caller (ablate's step timing, a test, a
    # notebook) keeps its own count after it, even when the run fails: a count left at 1 made a later
    # test's float32 losses differ from its subprocess reference by 1.4e-6 (dev/LOG.md, 2026-12-02)
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 2, "train.num_threads": 1})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(cfg, tmp_path / "run", echo=False)
        assert torch.get_num_threads() == 2

        def stopped(self):
            assert torch.get_num_threads() == 1  # the run's own count while it trains
            raise KeyboardInterrupt

        monkeypatch.setattr(TrainLoader, "next_batch", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "stopped", echo=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("loop_from_epoch", [0, 99])
def test_evaluation_loops_only_where_training_did(bpe_ds, tmp_path, loop_from_epoch):
    """A run whose loop never starts reports (and saves) the unlooped network; one looped from
    the start the looped one: the reported loss is what each saved network gives."""
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 4, "model.n_layer": 3, "model.loop_start": 1, "model.loop_end": 1,
                                  "model.loop_repeats": 3, "model.loop_from_epoch": loop_from_epoch})
    result = train(cfg, tmp_path / "run", echo=False)
    model, wcfg, extra = load_model(tmp_path / "run")
    assert model.loop_active == extra["loop_active"] == (loop_from_epoch == 0)
    ds = Dataset.open(bpe_ds)
    val = ds.tokens("val")[:4096]
    reported = result["variants"]["final"]["val_loss"]
    as_trained = evaluate(model, ds.tokens("val"), wcfg.model.seq_len, ds.token_bytes).loss
    assert as_trained == pytest.approx(reported, rel=1e-5)
    model.loop_active = not model.loop_active  # the other network is a different function
    assert abs(evaluate(model, val, wcfg.model.seq_len, ds.token_bytes).loss - reported) > 1e-4


def test_refuses_to_overwrite_a_run(bpe_ds, tmp_path):
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 2})
    train(cfg, tmp_path / "run", echo=False)
    before = (tmp_path / "run" / "result.json").read_text()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg, tmp_path / "run", echo=False)
    assert (tmp_path / "run" / "result.json").read_text() == before


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(bpe_ds, tmp_path, monkeypatch):
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 10, "train.checkpoint_every": 2})
    real = GPT.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        logits, loss = real(self, *a, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 .*last good checkpoint is .*step_0000004"):
        train(cfg, tmp_path / "run", echo=False)
    ck = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert ck.step == 4 and all(torch.isfinite(v).all() for v in ck.model.values())
    assert "stopping: loss is nan at step 5" in (tmp_path / "run" / "log.txt").read_text()
    assert not (tmp_path / "run" / "result.json").exists()


def test_snapshot_ensemble_and_distillation(bpe_ds, tmp_path):
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 12, "train.snapshot_cycles": 3, "train.snapshot_noise": 0.01})
    result = train(cfg, tmp_path / "snap", echo=False)
    assert len(list((tmp_path / "snap" / "swa").glob("cycle_*.safetensors"))) == 3
    assert {"snapshot_probs", "snapshot_params"} <= set(result["variants"])
    student = smoke_config(bpe_ds, **{"train.max_steps": 6, "distill.teacher": str(tmp_path / "snap"),
                                       "distill.alpha": 0.5})
    r2 = train(student, tmp_path / "student", echo=False)
    assert math.isfinite(r2["val_loss"])


def test_distillation_is_used_and_keeps_the_mtp_term(bpe_ds, tmp_path):
    """The first step's loss (from the same initial weights) shows whether the teacher and the MTP head count."""
    teacher = train(smoke_config(bpe_ds, **{"train.max_steps": 20, "eval.test": False}), tmp_path / "teacher", echo=False)
    assert teacher["val_loss"] < 6.0
    first = {}
    for name, over in {"plain": {}, "distill": {"distill.teacher": str(tmp_path / "teacher"), "distill.alpha": 0.9},
                       "distill+mtp": {"distill.teacher": str(tmp_path / "teacher"), "distill.alpha": 0.9,
                                       "model.mtp_weight": 0.5}}.items():
        train(smoke_config(bpe_ds, **{"train.max_steps": 1, "eval.test": False, **over}), tmp_path / name, echo=False)
        first[name] = losses(tmp_path / name)[1]
    # two teachers are an ensemble: the same teacher twice teaches what it teaches alone; with the
    # 1-step "plain" run beside it, the average probability (and so the loss) differs
    for name, pair in {"twice": "teacher,teacher", "pair": "teacher,plain"}.items():
        teachers = ",".join(str(tmp_path / t) for t in pair.split(","))
        train(smoke_config(bpe_ds, **{"train.max_steps": 1, "eval.test": False, "distill.teacher": teachers,
                                      "distill.alpha": 0.9}), tmp_path / name, echo=False)
        first[name] = losses(tmp_path / name)[1]
    assert first["twice"] == pytest.approx(first["distill"], abs=1e-5)
    assert abs(first["pair"] - first["distill"]) > 0.05
    # at init CE is about ln(512) = 6.2; KL from a trained teacher is smaller, so the mix is lower
    assert first["distill"] < first["plain"] - 0.5
    # the MTP term (0.5 x about 6.2) is added on top of the distillation loss, not dropped
    assert first["distill+mtp"] > first["distill"] + 2.0


def test_eval_and_sample_commands(bpe_ds, tmp_path):
    cfg = smoke_config(bpe_ds, **{"train.max_steps": 4})
    result = train(cfg, tmp_path / "run", echo=False)
    r = subprocess.run([sys.executable, "-m", "slowrun", "eval", str(tmp_path / "run"), "--split", "test", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == pytest.approx(result["variants"]["final"]["test_loss"], rel=1e-5)
    ck = list_checkpoints(tmp_path / "run")[-1]
    r = subprocess.run([sys.executable, "-m", "slowrun", "eval", str(ck)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("val loss")
    r = subprocess.run([sys.executable, "-m", "slowrun", "sample", str(tmp_path / "run"), "--prompt", "The king",
                        "--max-new-tokens", "12", "--num-samples", "2"], capture_output=True)
    out = r.stdout.decode()  # as printed: a sampled "\r" stays one
    assert r.returncode == 0, r.stderr
    assert out.count("The king") == 2 and "--- sample 2" in out
    # printed as it is sampled: the same text as the ids sampled all at once, with the same seed
    from slowrun.sample import generate
    model, mcfg, _ = load_model(tmp_path / "run")
    tok = Dataset.open(bpe_ds).tokenizer
    ids = [tok.bos_id] + tok.encode("The king")
    g = torch.Generator().manual_seed(0)
    want = [generate(model, ids, 12, mcfg.model.seq_len, 0.8, 50, g) for _ in range(2)]
    expect = "".join(f"--- sample {i + 1}\nThe king{tok.decode(w)}\n" for i, w in enumerate(want))
    assert out == expect
    r = subprocess.run([sys.executable, "-m", "slowrun", "eval", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such run" in r.stderr


def test_sampling_scores_the_last_position_as_the_full_forward_does():
    """`stream` runs the model on the context and takes the last position's logits alone: the
    same logits as the full forward's last row, so greedy decoding picks the same ids; the
    context is cut to seq_len once the text is longer."""
    from slowrun.config import build_config
    from slowrun.sample import stream

    cfg = build_config("smoke", {"model.vocab_size": 300}).model
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, 300, (1, cfg.seq_len))
    with torch.no_grad():
        full = model(x)[0][0, -1]
        last = model.logits(model.hidden(x)[:, -1:])[0, -1]
    assert torch.allclose(full, last, atol=1e-5, rtol=1e-5)
    ids, want = [1, 2, 3], [1, 2, 3]
    with torch.no_grad():
        for _ in range(2 * cfg.seq_len):  # past seq_len: the window slides
            want.append(int(model(torch.tensor([want[-cfg.seq_len:]]))[0][0, -1].argmax()))
    assert list(stream(model, ids, 2 * cfg.seq_len, cfg.seq_len, temperature=0)) == want[3:]


def test_text_pieces_hold_back_a_split_character_until_it_is_complete():
    from slowrun.sample import text_pieces

    def decode(ids):  # a byte-level decoder: ids are bytes
        return bytes(ids).decode("utf-8", errors="replace")

    data = list("naïve 日本".encode())  # ï: 2 bytes, 日 and 本: 3 bytes each
    pieces = list(text_pieces(iter(data), decode))
    assert "".join(pieces) == "naïve 日本" and "\ufffd" not in "".join(pieces)
    assert pieces[:3] == ["n", "a", "ï"] and pieces[-2:] == ["日", "本"]  # one piece per character
    cut = data[:-1]  # a stream that stops inside a character gives what the decoder gives at the end
    assert "".join(text_pieces(iter(cut), decode)) == decode(cut) == "naïve 日\ufffd"


def test_gradient_accumulation_matches_one_big_batch(bpe_ds, tmp_path):
    common = {"train.max_steps": 4, "train.batch_tokens": 2048, "eval.test": False}
    a = train(smoke_config(bpe_ds, **common), tmp_path / "a", echo=False)
    b = train(smoke_config(bpe_ds, **common, **{"train.micro_batch_tokens": 512}), tmp_path / "b", echo=False)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5)
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    assert "4 micro-batches of 16 x 32" in (tmp_path / "b" / "log.txt").read_text()


def test_depth_zero_is_refused(bpe_ds):
    with pytest.raises(ConfigError, match="model.depth: must be -1"):
        smoke_config(bpe_ds, **{"model.depth": 0})


def test_failed_start_leaves_the_run_dir_reusable(bpe_ds, tmp_path):
    run = tmp_path / "run"
    bad = smoke_config(bpe_ds, **{"train.max_steps": 1, "distill.teacher": str(tmp_path / "no-such-teacher")})
    with pytest.raises(SlowrunError, match="no-such-teacher"):
        train(bad, run, echo=False)
    assert not (run / "config.toml").exists()
    train(smoke_config(bpe_ds, **{"train.max_steps": 1, "eval.test": False}), run, echo=False)
    assert (run / "result.json").is_file() and not (run / ".lock").exists()


def test_a_logging_backend_that_is_not_installed_is_refused_before_any_file(bpe_ds, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(SlowrunError, match=r"train.wandb=true needs the wandb package"):
        train(smoke_config(bpe_ds, **{"train.max_steps": 1, "train.wandb": True}), tmp_path / "run", echo=False)
    assert not (tmp_path / "run" / "config.toml").exists()


def test_a_start_stopped_before_its_first_checkpoint_is_replaced_by_a_new_start(bpe_ds, tmp_path, monkeypatch, capsys):
    """A NaN at step 1 leaves config.toml, log.txt and metrics.jsonl but no checkpoint: a new
    start into the same --run-dir (with a changed config) replaces them and says so; a run with
    a checkpoint is still refused."""
    run = tmp_path / "run"
    real = GPT.forward

    def poisoned(self, *a, **kw):
        logits, loss = real(self, *a, **kw)
        return logits, (loss * float("nan") if self.training else loss)

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        train(smoke_config(bpe_ds, **{"train.max_steps": 3}), run, echo=False)
    assert (run / "config.toml").is_file() and not list_checkpoints(run)
    monkeypatch.setattr(GPT, "forward", real)
    train(smoke_config(bpe_ds, **{"train.max_steps": 2, "eval.test": False, "optim.lr": 1e-3}), run)
    assert "held a start that stopped before its first checkpoint; starting it anew" in capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "train"] == [1, 2]  # the new start's rows only
    assert "loss is nan" not in (run / "log.txt").read_text()
    assert config_from_dict(tomllib.loads((run / "config.toml").read_text())).optim.lr == 1e-3
    with pytest.raises(TrainingError, match="already holds a run"):
        train(smoke_config(bpe_ds, **{"train.max_steps": 2}), run, echo=False)


def test_relative_data_path_is_stored_absolute(bpe_ds, tmp_path, monkeypatch):
    monkeypatch.chdir(bpe_ds.parent)
    train(smoke_config(bpe_ds.name, **{"train.max_steps": 1, "eval.test": False}), tmp_path / "run", echo=False)
    cfg = config_from_dict(tomllib.loads((tmp_path / "run" / "config.toml").read_text()))
    assert cfg.data.path == str(bpe_ds.resolve())


def test_run_dir_with_other_files_is_refused(bpe_ds, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--recipe", "smoke", "--data", str(bpe_ds),
                        "--run-dir", str(run), "--train.max_steps=1"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not empty and not a slowrun run (holds notes.txt)" in r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"] and (run / "notes.txt").read_text() == "keep me"


def test_curriculum_reaches_the_trainer(bpe_ds, tmp_path):
    """data.curriculum and data.curriculum_blocks are not ignored by the trainer: the same seed
    with each trains on other batches (other losses) and the run's config records it."""
    common = {"train.max_steps": 4, "eval.test": False, "train.save_final": False}
    train(smoke_config(bpe_ds, **common), tmp_path / "off", echo=False)
    train(smoke_config(bpe_ds, **common, **{"data.curriculum": "easy_to_hard"}), tmp_path / "on", echo=False)
    train(smoke_config(bpe_ds, **common, **{"data.curriculum": "easy_to_hard", "data.curriculum_blocks": 2}),
          tmp_path / "blocks", echo=False)
    assert len({tuple(losses(tmp_path / d).values()) for d in ("off", "on", "blocks")}) == 3
    assert 'curriculum = "easy_to_hard"' in (tmp_path / "on" / "config.toml").read_text()
    assert "curriculum_blocks = 2" in (tmp_path / "blocks" / "config.toml").read_text()


def test_step_time_is_logged_by_part(bpe_ds, tmp_path):
    """metrics.jsonl holds each step's forward+backward, communication and optimizer seconds,
    read after the step has finished: the parts add up to no more than the step."""
    train(smoke_config(bpe_ds, **{"train.max_steps": 3}), tmp_path / "run", echo=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 3
    for r in steps:
        parts = [r["fwd_bwd_s"], r["comm_s"], r["opt_s"]]
        assert all(p >= 0 for p in parts) and r["fwd_bwd_s"] > 0 and sum(parts) <= r["step_s"] + 1e-6


@pytest.mark.parametrize("over, message", [
    ({"model.seq_len": 4096, "train.batch_tokens": 4096}, r"model.seq_len: 4096 needs .*4,097 tokens.* val split holds 4,000"),
    ({"eval.reference_batch": 1000}, r"eval.reference_batch: 1000 .* val split holds 121 chunks of 33 tokens"),
])
def test_a_val_split_too_short_to_score_is_refused_before_training(bpe_ds, tmp_path, over, message):
    """Found at setup, before config.toml, not at the first evaluation after the training."""
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train(smoke_config(bpe_ds, **{"train.max_steps": 1, **over}), run, echo=False)
    assert not (run / "config.toml").exists() and not list_checkpoints(run)


def test_a_resume_at_the_final_evaluation_keeps_the_runs_throughput(bpe_ds, tmp_path, monkeypatch):
    """Killed during the final evaluation and resumed: no step runs in the resuming process, and
    result.json's tokens_per_s is still the run's own, not 0.0."""
    import slowrun.train as train_mod

    run = tmp_path / "run"
    real = train_mod.final_evaluation

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "final_evaluation", killed)
    with pytest.raises(KeyboardInterrupt):
        train(smoke_config(bpe_ds, **{"train.max_steps": 4, "eval.max_tokens": 512, "eval.test": False}), run, echo=False)
    assert not (run / "result.json").exists()
    monkeypatch.setattr(train_mod, "final_evaluation", real)
    result = train(None, run, resume=True, echo=False)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in steps if r.get("kind") == "train"][-1]
    assert result["steps"] == 4 and result["tokens_per_s"] == pytest.approx(last["tokens_per_s"], rel=1e-3)


def test_quiet_still_says_a_failed_start_is_started_anew(bpe_ds, tmp_path, capsys):
    from slowrun import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("# a start that stopped before its first checkpoint\n")
    assert cli.main(["train", "--recipe", "smoke", "--data", str(bpe_ds), "--run-dir", str(run), "--quiet",
                     "--train.max_steps=1", "--eval.test=false", "--eval.max_tokens=512"]) == 0
    assert "starting it anew" in capsys.readouterr().err


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_bf16_counts_only_where_the_device_has_it(monkeypatch):
    """train.dtype=bf16 computes in bf16 where the hardware has bf16 arithmetic, else in fp32:
    on x86 the CPU's flags say which (AVX512's BW and VL, or AMX: oneDNN's bf16 kernels)."""
    from slowrun import distributed
    from slowrun.distributed import CPU_BF16_ENV, compute_dtype, fast_bf16_available

    cpu = torch.device("cpu")
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    flags = _cpuinfo_flags()
    if flags is not None and ("avx2" in flags or "avx512f" in flags):  # an x86 Linux machine
        native = {"avx512bw", "avx512vl"} <= flags or "amx_bf16" in flags
        assert fast_bf16_available(cpu) == native
        assert compute_dtype("bf16", cpu) == ("bf16" if native else "fp32")
    for forced, want in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv(CPU_BF16_ENV, forced)
        assert compute_dtype("bf16", cpu) == want and compute_dtype("fp32", cpu) == "fp32"
    # a GPU older than Ampere (bf16 only emulated): fp32 too
    for has, want in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(distributed.torch.cuda, "is_bf16_supported", lambda including_emulation=True, has=has: has)
        assert compute_dtype("bf16", torch.device("cuda", 0)) == want


def test_a_bf16_run_without_bf16_hardware_trains_and_records_fp32(bpe_ds, tmp_path, monkeypatch):
    """A bf16 run on a CPU without bf16 kernels trains in fp32, says so, and records fp32 in
    config.toml, its result and its ledger key (which a planned run's key, resolved on the same
    machine, finds); a resumed run keeps the precision its config.toml recorded."""
    import slowrun.train as train_mod
    from slowrun.config import config_to_dict
    from slowrun.distributed import CPU_BF16_ENV
    from slowrun.ledger import config_key, entry_from_result
    from slowrun.train import resolve

    cfg = smoke_config(bpe_ds, **{"train.max_steps": 3, "eval.max_tokens": 512, "eval.test": False, "train.dtype": "bf16"})
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    run = tmp_path / "fp32"
    result = train(cfg, run, echo=False)
    assert tomllib.loads((run / "config.toml").read_text())["train"]["dtype"] == "fp32"
    assert result["config"]["train"]["dtype"] == "fp32"
    assert "train.dtype: bf16 -> fp32: this CPU has no bf16 arithmetic" in (run / "log.txt").read_text()
    planned = config_key(config_to_dict(resolve(cfg, Dataset.open(bpe_ds))))
    assert entry_from_result(result, {})["key"] == planned != config_key(config_to_dict(cfg))

    # started where bf16 is computed, stopped at the final evaluation, resumed where it is not: still bf16
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    real = train_mod.final_evaluation

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "final_evaluation", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "bf16", echo=False)
    monkeypatch.setattr(train_mod, "final_evaluation", real)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    resumed = train(None, tmp_path / "bf16", resume=True, echo=False)
    assert resumed["config"]["train"]["dtype"] == "bf16" and "train.dtype: bf16 ->" not in (tmp_path / "bf16" / "log.txt").read_text()
