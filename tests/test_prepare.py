import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slowrun.dataset import Dataset, DatasetError
from slowrun.prepare import PrepareConfig, PrepareError, prepare
from slowrun.sources import builtin_corpus
from slowrun.tokenizer import GPT2Tokenizer, TokenizerError


def split_docs(ds: Dataset, split: str) -> list[tuple]:
    tokens = np.asarray(ds.tokens(split))
    starts = list(ds.doc_starts(split)) + [len(tokens)]
    return [tuple(tokens[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def test_manifest_and_counts(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    m = ds.manifest
    assert m["dtype"] == "uint16" and m["tokenizer"]["id"] == "gpt2"
    for split, n in (("train", 20_000), ("val", 4_000), ("test", 4_000)):
        assert ds.num_tokens(split) == n == len(ds.tokens(split))
        # the nanoGPT layout: a flat memmap-readable array
        assert len(np.memmap(gpt2_ds / f"{split}.bin", dtype=np.uint16, mode="r")) == n
    assert set(m["files"]) == {"train.bin", "val.bin", "test.bin", "train.docs.npy", "val.docs.npy",
                               "test.docs.npy", "token_bytes.npy"}
    assert m["params"]["train_tokens"] == 20_000


def test_read_back_matches_the_source(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    tok = GPT2Tokenizer()
    docs = builtin_corpus().heldout
    order = np.random.default_rng(0).permutation(len(docs))
    val = split_docs(ds, "val")
    for i, doc in enumerate(val[:-1]):  # the last document of a split may be cut
        assert doc[0] == tok.bos_id
        assert tok.decode(doc[1:]) == docs[order[i]]
    # every document starts with BOS and BOS appears nowhere else
    for split in ("train", "val", "test"):
        tokens = np.asarray(ds.tokens(split))
        assert np.array_equal(np.flatnonzero(tokens == tok.bos_id), ds.doc_starts(split))


def test_splits_are_disjoint(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    sets = {s: set(split_docs(ds, s)) for s in ("train", "val", "test")}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]


def test_nested_budgets_and_determinism(tmp_path, prepare_dataset, gpt2_ds):
    big = prepare_dataset(tmp_path / "big", train_tokens=50_000)
    again = prepare_dataset(tmp_path / "again")
    small, large = Dataset.open(gpt2_ds), Dataset.open(big)
    assert small.manifest["files"]["val.bin"] == large.manifest["files"]["val.bin"]
    assert small.manifest["files"]["test.bin"] == large.manifest["files"]["test.bin"]
    assert np.array_equal(np.asarray(large.tokens("train"))[:20_000], np.asarray(small.tokens("train")))
    assert Dataset.open(again).manifest["files"] == small.manifest["files"]


def test_bpe_dataset_trained_on_train_text_only(bpe_ds):
    ds = Dataset.open(bpe_ds)
    tok = ds.manifest["tokenizer"]
    assert tok["id"] == "bpe:512" and tok["vocab_size"] == 512 and tok["bos_id"] == 0
    lo, hi = tok["trained_on"]["documents"]
    n_heldout = len(ds.doc_starts("val")) + len(ds.doc_starts("test"))
    assert lo >= n_heldout  # the BPE never saw a val/test document
    assert (bpe_ds / "tokenizer.json").is_file()


def test_shared_tokenizer_keeps_val_test_identical(tmp_path, prepare_dataset, bpe_ds):
    other = prepare_dataset(tmp_path / "bpe2x", tokenizer=str(bpe_ds / "tokenizer.json"), train_tokens=80_000)
    a, b = Dataset.open(bpe_ds), Dataset.open(other)
    assert a.manifest["files"]["val.bin"] == b.manifest["files"]["val.bin"]
    assert a.manifest["files"]["test.bin"] == b.manifest["files"]["test.bin"]
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(np.asarray(b.tokens("train"))[:40_000], np.asarray(a.tokens("train")))


def test_flipped_byte_is_caught(tmp_path, prepare_dataset):
    out = prepare_dataset(tmp_path / "ds")
    Dataset.open(out)
    with open(out / "train.bin", "r+b") as f:
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(DatasetError, match="train.bin: sha256 does not match"):
        Dataset.open(out)


# sources ------------------------------------------------------------------------------


def test_txt_jsonl_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("First document about cats.\n===\nSecond document about dogs.\n===\n")
    (src / "b.jsonl").write_text(json.dumps({"text": "Third document, from jsonl."}) + "\n\n"
                                 + json.dumps({"text": "Fourth one."}) + "\n")
    out = prepare(PrepareConfig(source=str(src), tokenizer="gpt2", train_tokens=10, val_tokens=5, test_tokens=5,
                                out=str(tmp_path / "ds"), separator="===", progress=False))
    m = Dataset.open(out).manifest
    assert m["source"]["kind"] == "local" and m["source"]["files"] == 2
    assert sum(m["splits"][s]["documents"] for s in ("train", "val", "test")) <= 4


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"Document number {i} says something about the weather." for i in range(50)]
    pq.write_table(pa.table({"text": texts, "id": list(range(50))}), tmp_path / "part.parquet")
    out = prepare(PrepareConfig(source=str(tmp_path / "part.parquet"), tokenizer="gpt2", train_tokens=200,
                                val_tokens=50, test_tokens=50, out=str(tmp_path / "ds"), progress=False))
    ds = Dataset.open(out)
    tok = GPT2Tokenizer()
    every = set(texts)
    for split in ("val", "train"):
        docs = split_docs(ds, split)
        assert all(tok.decode(d[1:]) in every for d in docs[:-1])


def test_hf_streaming_path_with_local_parquet(tmp_path):
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"Streamed document {i}: the river ran past the old mill." for i in range(60)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "shard.parquet")
    out = prepare(PrepareConfig(source="hf:parquet", data_files=[str(tmp_path / "shard.parquet")], tokenizer="gpt2",
                                train_tokens=300, val_tokens=100, test_tokens=100, out=str(tmp_path / "ds"), progress=False))
    ds = Dataset.open(out)
    tok = GPT2Tokenizer()
    # stream order, not shuffled: val starts with the first streamed document
    assert tok.decode(split_docs(ds, "val")[0][1:]) == texts[0]
    assert ds.manifest["source"]["kind"] == "hf"


def _write_pt(path, docs, bos=50256):
    tokens, starts = [], []
    for d in docs:
        starts.append(len(tokens))
        tokens += [bos] + d
    torch.save({"tokens": torch.tensor(tokens, dtype=torch.int32), "doc_starts": torch.tensor(starts),
                "bos_id": bos}, path)


def test_reference_pt_files(tmp_path):
    rng = np.random.default_rng(0)
    val_docs = [list(rng.integers(0, 50000, rng.integers(5, 40))) for _ in range(30)]
    train_docs = [list(rng.integers(0, 50000, rng.integers(5, 40))) for _ in range(60)]
    ref = tmp_path / "ref"
    ref.mkdir()
    _write_pt(ref / "fineweb_val.pt", val_docs)
    _write_pt(ref / "fineweb_train.pt", train_docs)
    out = prepare(PrepareConfig(source=str(ref), tokenizer="gpt2", train_tokens=500, val_tokens=200, test_tokens=100,
                                out=str(tmp_path / "ds"), progress=False))
    ds = Dataset.open(out)
    flat_val = np.concatenate([[50256] + d for d in val_docs])
    flat_train = np.concatenate([[50256] + d for d in train_docs])
    assert np.array_equal(np.asarray(ds.tokens("val")), flat_val[:200])
    # a document never straddles splits: test starts at the first document after val's (cut) last one
    next_doc = min(i for i in np.flatnonzero(flat_val == 50256) if i >= 200)
    assert np.array_equal(np.asarray(ds.tokens("test")), flat_val[next_doc:next_doc + 100])
    assert np.array_equal(np.asarray(ds.tokens("train")), flat_train[:500])
    with pytest.raises(PrepareError, match="already GPT-2 tokenized"):
        prepare(PrepareConfig(source=str(ref), tokenizer="bpe:300", out=str(tmp_path / "x"), progress=False))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_pt_file_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"tokens": _Exploit(marker)}, f)
    with pytest.raises(PrepareError, match="weights_only"):
        prepare(PrepareConfig(source=str(evil), out=str(tmp_path / "ds"), progress=False))
    assert not marker.exists()


# bad input ------------------------------------------------------------------------------


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(PrepareError, match="no such file or directory"):
        prepare(PrepareConfig(source=str(tmp_path / "nope"), out=str(tmp_path / "ds"), progress=False))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(PrepareError, match="corpus is empty"):
        prepare(PrepareConfig(source=str(tmp_path / "empty"), out=str(tmp_path / "ds"), progress=False))
    assert not (tmp_path / "ds").exists()


def test_budget_larger_than_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("A small corpus of a few words only.")
    with pytest.raises(PrepareError, match=r"more than the source can give: the source holds \d+ tokens"):
        prepare(PrepareConfig(source=str(tmp_path / "src"), tokenizer="gpt2", train_tokens=10_000, val_tokens=3,
                              test_tokens=3, out=str(tmp_path / "ds"), progress=False))
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


def test_unknown_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        prepare(PrepareConfig(tokenizer="wordpiece", out=str(tmp_path / "ds"), progress=False))


def test_out_dir_with_a_different_dataset(tmp_path, prepare_dataset):
    out = prepare_dataset(tmp_path / "ds")
    before = (out / "manifest.json").read_text()
    assert prepare_dataset(out) == out  # same parameters: nothing to do
    with pytest.raises(PrepareError, match="already holds a different dataset; use --force"):
        prepare_dataset(out, train_tokens=30_000)
    assert (out / "manifest.json").read_text() == before
    prepare_dataset(out, train_tokens=30_000, force=True)
    assert Dataset.open(out).num_tokens("train") == 30_000
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="other files"):
        prepare_dataset(tmp_path / "other")


def test_interruption_leaves_nothing_half_written(tmp_path, prepare_dataset, monkeypatch):
    out = prepare_dataset(tmp_path / "ds")
    before = Dataset.open(out).manifest
    import slowrun.prepare as prep

    calls = {"n": 0}
    real_add = prep._SplitWriter.add

    def add(self, ids):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real_add(self, ids)

    monkeypatch.setattr(prep._SplitWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(out, train_tokens=30_000, force=True)
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        prepare_dataset(tmp_path / "fresh")
    assert Dataset.open(out).manifest == before  # the old dataset is intact and verifies
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary leftovers


def test_two_prepares_into_one_out_one_wins(tmp_path):
    """Run at once (different seeds): one succeeds, the other is refused in one line; nothing is replaced."""
    out = tmp_path / "data"
    args = ["--tokenizer", "gpt2", "--train-tokens", "20000", "--val-tokens", "4000", "--test-tokens", "4000",
            "--out", str(out), "--no-progress"]
    procs = {seed: subprocess.Popen([sys.executable, "-m", "slowrun", "prepare", *args, "--seed", str(seed)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)}
    results = {seed: (p.wait(timeout=300), p.stderr.read()) for seed, p in procs.items()}
    winners = [seed for seed, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    loser_rc, loser_err = results[3 - winners[0]]
    assert loser_rc == 2 and len(loser_err.strip().splitlines()) == 1 and "Traceback" not in loser_err
    assert Dataset.open(out).manifest["params"]["seed"] == winners[0]


def test_a_held_lock_refuses_prepare(tmp_path):
    from slowrun.storage import BusyError, exclusive_lock

    out = tmp_path / "data"
    with exclusive_lock(tmp_path / ".data.lock", f"--out {out}"):
        with pytest.raises(BusyError, match="in use by another slowrun process"):
            prepare(PrepareConfig(source="builtin", tokenizer="gpt2", train_tokens=1000, val_tokens=1000,
                                  test_tokens=1000, out=str(out), progress=False))
    assert not out.exists()


def _edit_manifest(ds, edit, rehash=False):
    import hashlib
    import json

    mf = ds / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m)
    if rehash:  # an edit that also fixes the manifest's own hash still has to agree with the files
        body = {k: v for k, v in m.items() if k != "sha256"}
        m["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    mf.write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("edit, rehash_message", [
    (lambda m: m["tokenizer"].update(vocab_size=m["tokenizer"]["vocab_size"] + 1), "does not match the"),
    (lambda m: m["tokenizer"].update(vocab_size=1000), "does not match the"),
    (lambda m: m.update(dtype="uint32"), "holds"),
    (lambda m: m.update(dtype="float64"), "is not one of uint16, uint32"),
    (lambda m: m["splits"]["train"].update(tokens=19_000), "listed as 19,000 tokens"),
])
def test_edited_manifest_is_refused_in_one_line(tmp_path, gpt2_ds, edit, rehash_message):
    ds = tmp_path / "ds"
    shutil.copytree(gpt2_ds, ds)
    _edit_manifest(ds, edit)
    with pytest.raises(DatasetError, match="edited or corrupt"):
        Dataset.open(ds, verify=False)
    _edit_manifest(ds, lambda m: None, rehash=True)
    with pytest.raises(DatasetError, match=rehash_message):
        Dataset.open(ds, verify=False)
    r = subprocess.run([sys.executable, "-m", "slowrun", "data", "info", str(ds)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_manifest_without_its_own_hash_is_checked_against_the_tokens(tmp_path, gpt2_ds):
    """A manifest from before the hash existed, edited so the file sizes still agree (dtype
    uint32, half the tokens): the token ids read that way lie outside the vocabulary."""
    ds = tmp_path / "ds"
    shutil.copytree(gpt2_ds, ds)

    def edit(m):
        del m["sha256"]
        m["dtype"] = "uint32"
        for s in m["splits"].values():
            s["tokens"] //= 2

    _edit_manifest(ds, edit)
    Dataset.open(ds, verify=False)  # the cheap checks cannot see it
    with pytest.raises(DatasetError, match="outside the manifest's vocabulary of 50,257"):
        Dataset.open(ds)
    r = subprocess.run([sys.executable, "-m", "slowrun", "train", "--recipe", "smoke", "--data", str(ds), "--run-dir",
                        str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "outside the manifest's vocabulary" in r.stderr


def test_binary_files_are_not_read_as_text(tmp_path):
    import numpy as np

    from slowrun.sources import SourceError, local_corpus

    np.save(tmp_path / "tokens.npy", np.arange(100, dtype=np.uint16))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "nul.txt").write_bytes(b"text\0with a NUL")
    for name, kind in (("tokens.npy", "a numpy array"), ("objects.npy", "a numpy array"), ("nul.txt", "NUL bytes")):
        with pytest.raises(SourceError, match=kind):
            local_corpus(tmp_path / name)
    r = subprocess.run([sys.executable, "-m", "slowrun", "prepare", "--source", str(tmp_path / "tokens.npy"), "--separator",
                        "\\x00\\x00", "--out", str(tmp_path / "ds")], capture_output=True, text=True)
    assert r.returncode == 2 and "a numpy array, not text" in r.stderr and not (tmp_path / "ds").exists()


def test_val_loss_on_the_references_files_equals_the_references_way(tmp_path):
    """Its .pt files prepared by `slowrun prepare` (the whole val file, no test split): our val
    loss with eval.reference_batch equals the reference's loader computed on the raw .pt
    tokens (chunks of T+1 of the val file, RandomState(42) order, whole batches of world x B)."""
    import torch.nn.functional as F

    from slowrun.config import build_config
    from slowrun.evaluate import evaluate, split_tokens
    from slowrun.gpt import GPT

    rng = np.random.default_rng(1)
    ref = tmp_path / "ref"
    ref.mkdir()
    _write_pt(ref / "fineweb_val.pt", [list(rng.integers(0, 50000, rng.integers(5, 400))) for _ in range(160)])
    _write_pt(ref / "fineweb_train.pt", [list(rng.integers(0, 50000, rng.integers(5, 60))) for _ in range(60)])
    val = torch.load(ref / "fineweb_val.pt", weights_only=True)
    L = 6_000  # the val file's length: as 10M tokens at T = 2048, its eval steps cover n - n % (world x B) chunks
    torch.save({"tokens": val["tokens"][:L], "doc_starts": val["doc_starts"][val["doc_starts"] < L], "bos_id": 50256},
               ref / "fineweb_val.pt")
    raw = torch.load(ref / "fineweb_val.pt", weights_only=True)["tokens"].long()
    out = prepare(PrepareConfig(source=str(ref), tokenizer="gpt2", train_tokens=500, val_tokens=len(raw), test_tokens=0,
                                out=str(tmp_path / "ds"), progress=False))
    ds = Dataset.open(out)
    T, B, world = 128, 2, 2
    cfg = build_config("limited", {"model.vocab_size": 50257, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 2,
                                   "model.seq_len": T, "model.short_window": 32, "model.loop_start": -1,
                                   "model.dropout": 0.0, "eval.reference_batch": B * world})
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    n = len(raw) // (T + 1)
    chunks = raw[: n * (T + 1)].view(n, T + 1)
    order = np.random.RandomState(42).permutation(n)
    total, count = 0.0, 0
    steps = len(raw) // (B * T * world)  # the reference's eval_steps = EVAL_TOKENS // (B * T * world)
    assert n % (B * world) and steps * B * world == n - n % (B * world)  # some chunks are never scored
    with torch.no_grad():
        for step in range(steps):
            for rank in range(world):
                x = chunks[order[(step * world + rank) * B: (step * world + rank + 1) * B]]
                logits, _ = model(x[:, :-1])
                total += F.cross_entropy(logits.double().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
                count += x[:, 1:].numel()
    ours = evaluate(model, split_tokens(ds, "val", T, cfg.eval.reference_batch), T, ds.token_bytes)
    assert ds.num_tokens("val") == len(raw) and ds.num_tokens("test") == 0
    assert ours.targets == count < n * T and abs(ours.loss - total / count) < 1e-4


# leftovers and limits --------------------------------------------------------------------


KILL_DURING_PREPARE = """
import os, signal, sys
import slowrun.prepare as prep
real_add, calls = prep._SplitWriter.add, [0]
def add(self, ids):  # SIGKILL half-way through writing the splits: nothing of prepare's own runs after it
    calls[0] += 1
    if calls[0] == 30:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_add(self, ids)
prep._SplitWriter.add = add
prep.prepare(prep.PrepareConfig(source="builtin", tokenizer="gpt2", train_tokens=20_000, val_tokens=4_000, test_tokens=4_000,
                                out=sys.argv[1], progress=False))
"""


def test_a_killed_prepares_leftovers_are_removed_by_the_next(tmp_path, prepare_dataset):
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-c", KILL_DURING_PREPARE, str(out)], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name != ".ds.lock"]  # the lock's file is empty, and taken again
    assert len(left) == 1 and left[0].startswith(".ds.") and left[0].endswith(".partial")  # what a SIGKILL leaves
    (tmp_path / ".ds.old-12345").mkdir()  # a copy moved aside by a --force replace killed before removing it
    other = tmp_path / ".ds2.abcd_123.partial"  # another --out's: not this prepare's to remove
    other.mkdir()
    prepare_dataset(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds2.abcd_123.partial", "ds"]
    # the same again with the dataset already there (nothing to prepare): the leftovers still go
    stale = tmp_path / ".ds.zz99zz99.partial"
    stale.mkdir()
    prepare_dataset(out)
    assert not stale.exists()


def test_a_live_prepares_build_directory_is_never_removed(tmp_path):
    from slowrun.storage import BusyError, exclusive_lock

    out = tmp_path / "data"
    live = tmp_path / ".data.abcdefgh.partial"
    with exclusive_lock(tmp_path / ".data.lock", f"--out {out}"):  # as a prepare that is writing it holds
        live.mkdir()
        with pytest.raises(BusyError):
            prepare(PrepareConfig(source="builtin", tokenizer="gpt2", train_tokens=1000, val_tokens=1000,
                                  test_tokens=1000, out=str(out), progress=False))
        assert live.is_dir()


def test_a_replace_killed_between_its_renames_gets_the_old_dataset_back(tmp_path, prepare_dataset):
    """`--force` moves the old dataset aside, then renames the new one in: killed in between, the
    old one is put back (the new one was never complete as far as anyone knows)."""
    out = prepare_dataset(tmp_path / "ds")
    before = Dataset.open(out).manifest
    out.rename(tmp_path / ".ds.old-4242")
    (tmp_path / ".ds.q1w2e3r4.partial").mkdir()
    assert prepare_dataset(out) == out and Dataset.open(out, verify=True).manifest == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


THREAD_CPU = """
import os, sys
from slowrun.cli import main
rc = main(["prepare", "--tokenizer", sys.argv[2], "--train-tokens", "300k", "--val-tokens", "20k", "--test-tokens", "20k",
           "--out", sys.argv[1], "--no-progress", "--threads", "1"])
f = open(f"/proc/self/task/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()
main_s = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
t = os.times()  # the whole process: its threads too, also those that have ended
print(rc, main_s, t.user + t.system - main_s)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread CPU times are read from /proc")
@pytest.mark.parametrize("tokenizer", ["bpe:512", "gpt2"])
def test_threads_1_keeps_prepare_on_one_thread(tmp_path, tokenizer):
    """--threads 1: the BPE's training and the tokenization run on the main thread, no pool beside it."""
    r = subprocess.run([sys.executable, "-c", THREAD_CPU, str(tmp_path / "ds"), tokenizer], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rc, main_s, others_s = r.stdout.split()[-3:]
    assert rc == "0" and float(main_s) > 0.3 and float(others_s) < 0.05 * float(main_s) + 0.02, r.stdout
