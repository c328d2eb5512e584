import inspect
from collections import Counter

import numpy as np
import pytest

from slowrun.dataset import Dataset
from slowrun.loader import TrainLoader, fitness_slice


def epoch_sequences(loader, epoch):
    return [loader.sequence(epoch, i) for i in range(loader.seqs_per_epoch)]


def test_each_epoch_uses_every_token_once(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    T = 64
    loader = TrainLoader(ds, T, batch_seqs=8, seed=3)
    train = np.asarray(ds.tokens("train"))
    # the documents, as token multisets
    for epoch in (0, 1):
        seqs = epoch_sequences(loader, epoch)
        # consecutive sequences of the stream overlap by exactly one token (the last target)
        stream_len = loader.seqs_per_epoch * T
        inputs = Counter(np.concatenate([s[:-1] for s in seqs]).tolist())
        assert sum(inputs.values()) == stream_len <= len(train)
        assert not inputs - Counter(train.tolist())  # never a token that is not in the training split


def test_boundaries_move_between_epochs(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    loader = TrainLoader(ds, 64, batch_seqs=8, seed=0)
    a = {tuple(s) for s in epoch_sequences(loader, 0)}
    b = {tuple(s) for s in epoch_sequences(loader, 1)}
    assert len(a & b) < 0.05 * len(a)
    fixed = TrainLoader(ds, 64, batch_seqs=8, seed=0, doc_shuffle=False, seq_shuffle=False)
    first = fixed.sequence(0, 0)
    assert np.array_equal(first, np.asarray(ds.tokens("train"))[:65])  # in file order, from the start
    assert {tuple(s) for s in epoch_sequences(fixed, 0)} == {tuple(s) for s in epoch_sequences(fixed, 1)}


def test_deterministic_and_resumable(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    a = TrainLoader(ds, 32, batch_seqs=16, seed=5)
    batches = [a.next_batch() for _ in range(80)]  # crosses several epochs
    assert a.epoch >= 2
    b = TrainLoader(ds, 32, batch_seqs=16, seed=5)
    for _ in range(20):
        b.next_batch()
    state = b.state_dict()
    c = TrainLoader(ds, 32, batch_seqs=16, seed=5)
    c.load_state_dict(state)
    for i in range(20, 80):
        x, y = c.next_batch()
        assert np.array_equal(x, batches[i][0]) and np.array_equal(y, batches[i][1])
    x, y = batches[0]
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    other = TrainLoader(ds, 32, batch_seqs=16, seed=6).next_batch()[0]
    assert not np.array_equal(other, batches[0][0])


def test_ranks_split_the_global_batch(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    whole = TrainLoader(ds, 32, batch_seqs=12, seed=1)
    parts = [TrainLoader(ds, 32, batch_seqs=12, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        x, _ = whole.next_batch()
        xs = [p.next_batch()[0] for p in parts]
        assert np.array_equal(np.concatenate(xs), x)
    with pytest.raises(ValueError, match="does not split"):
        TrainLoader(ds, 32, batch_seqs=10, world_size=3)


def test_reads_only_the_training_split(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    assert "split" not in inspect.signature(TrainLoader).parameters
    loader = TrainLoader(ds, 32, batch_seqs=4)
    assert isinstance(loader.tokens, np.memmap) and str(loader.tokens.filename).endswith("train.bin")


def test_fitness_slice_is_never_trained_on(gpt2_ds):
    ds = Dataset.open(gpt2_ds)
    loader = TrainLoader(ds, 32, batch_seqs=4, fitness_tokens=3000)
    assert loader.num_tokens == 17_000
    fit = fitness_slice(ds, 3000)
    assert len(fit) == 3000 and np.array_equal(fit, np.asarray(ds.tokens("train"))[17_000:])
    # a full epoch never serves a token from the slice: mark those tokens and look for the mark
    marked = np.asarray(ds.tokens("train")).astype(np.int64)
    marked[17_000:] = -1
    loader.tokens = marked
    served = np.concatenate([loader.sequence(0, i) for i in range(loader.seqs_per_epoch)])
    assert len(served) == loader.seqs_per_epoch * 33 and (served >= 0).all()
    unfenced = TrainLoader(ds, 32, batch_seqs=4)  # the check can fail: without the cut, marked tokens are served
    unfenced.tokens = marked
    assert any((unfenced.sequence(0, i) < 0).any() for i in range(unfenced.seqs_per_epoch))
    with pytest.raises(ValueError, match="half or more"):
        fitness_slice(ds, 15_000)


def test_curriculum_off_is_todays_order(gpt2_ds):
    """Off (the default), the plan is the one of today's loader: documents permuted, then
    sequences permuted, by one generator seeded (seed, epoch)."""
    ds = Dataset.open(gpt2_ds)
    default = TrainLoader(ds, 32, batch_seqs=8, seed=7)
    off = TrainLoader(ds, 32, batch_seqs=8, seed=7, curriculum="off", doc_scores=np.arange(5.0))
    starts = ds.doc_starts("train").astype(np.int64)
    lens = np.diff(np.append(starts, len(ds.tokens("train"))))
    for epoch in (0, 3):
        rng = np.random.default_rng([7, epoch])
        order = rng.permutation(len(starts))
        seqs = rng.permutation(default.seqs_per_epoch)
        for loader in (default, off):
            p = loader.plan(epoch)
            assert np.array_equal(p.doc_start, starts[order]) and np.array_equal(p.seq_order, seqs)
            assert np.array_equal(np.diff(p.offsets), lens[order])
    assert all(np.array_equal(default.next_batch()[0], off.next_batch()[0]) for _ in range(5))


@pytest.mark.parametrize("schedule", ["easy_to_hard", "hard_to_easy", "mixed"])
def test_curriculum_orders_documents_by_score(gpt2_ds, schedule):
    from slowrun.curriculum import document_scores

    ds = Dataset.open(gpt2_ds)
    scores = document_scores(ds, "length", 32)
    assert len(scores) == len(ds.doc_starts("train")) > 3
    loader = TrainLoader(ds, 32, batch_seqs=8, seed=1, curriculum=schedule, doc_scores=scores)
    starts = list(loader.doc_starts)
    for epoch in (0, 1):
        p = loader.plan(epoch)
        served = scores[[starts.index(s) for s in p.doc_start]]  # the score of each document, in serving order
        up = schedule == "easy_to_hard" or (schedule == "mixed" and epoch == 0)
        assert np.all(np.diff(served) >= 0) if up else np.all(np.diff(served) <= 0)
        assert np.array_equal(p.seq_order, np.arange(loader.seqs_per_epoch))  # stream order: the curriculum holds
    # the first sequence of the epoch starts the easiest (hardest) document
    first = loader.sequence(0, 0)
    i = int(np.argmin(scores) if schedule != "hard_to_easy" else np.argmax(scores))
    assert np.array_equal(first[:5], np.asarray(ds.tokens("train"))[starts[i]:starts[i] + 5])
    with pytest.raises(ValueError, match="one score per training document"):
        TrainLoader(ds, 32, batch_seqs=8, curriculum=schedule, doc_scores=scores[:-1])


def test_curriculum_blocks_shuffle_within_each_block_only(gpt2_ds):
    """A bucketed curriculum: the documents in the sorted order as without blocks; the sequences
    a permutation of each consecutive block's own (so the order by difficulty holds from block to
    block), drawn again each epoch, the same for the same (seed, epoch)."""
    from slowrun.config import ConfigError, build_config
    from slowrun.curriculum import document_scores

    ds = Dataset.open(gpt2_ds)
    scores = document_scores(ds, "length", 32)
    plain = TrainLoader(ds, 32, batch_seqs=8, seed=3, curriculum="easy_to_hard", doc_scores=scores)
    blocked = TrainLoader(ds, 32, batch_seqs=8, seed=3, curriculum="easy_to_hard", doc_scores=scores, curriculum_blocks=4)
    n = blocked.seqs_per_epoch
    assert n >= 40
    bounds = np.cumsum([0] + [len(b) for b in np.array_split(np.arange(n), 4)])
    orders = []
    for epoch in (0, 1):
        p, q = blocked.plan(epoch), plain.plan(epoch)
        assert np.array_equal(p.doc_start, q.doc_start) and np.array_equal(p.offsets, q.offsets)
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert sorted(p.seq_order[a:b]) == list(range(a, b))
            assert not np.array_equal(p.seq_order[a:b], np.arange(a, b))  # shuffled, not stream order
        orders.append(p.seq_order.copy())
    assert not np.array_equal(orders[0], orders[1])
    again = TrainLoader(ds, 32, batch_seqs=8, seed=3, curriculum="easy_to_hard", doc_scores=scores, curriculum_blocks=4)
    assert np.array_equal(again.plan(1).seq_order, orders[1])
    one = TrainLoader(ds, 32, batch_seqs=8, seed=3, curriculum="easy_to_hard", doc_scores=scores, curriculum_blocks=n + 5)
    assert np.array_equal(one.plan(0).seq_order, np.arange(n))  # a block per sequence: stream order
    with pytest.raises(ValueError, match="0 without a curriculum"):
        TrainLoader(ds, 32, batch_seqs=8, curriculum_blocks=4)
    with pytest.raises(ConfigError, match="data.curriculum_blocks: shuffles within a curriculum's blocks"):
        build_config("smoke", {"data.curriculum_blocks": 4})
    with pytest.raises(ConfigError, match="data.curriculum_blocks: must be >= 0"):
        build_config("smoke", {"data.curriculum_blocks": -1, "data.curriculum": "mixed"})


def test_document_scores_by_a_model_are_cached(gpt2_ds, tmp_path, smoke_cfg, monkeypatch):
    import torch

    from slowrun import curriculum
    from slowrun.checkpoint import save_weights
    from slowrun.gpt import GPT

    ds = Dataset.open(gpt2_ds)
    cfg = smoke_cfg(gpt2_ds, **{"model.vocab_size": ds.vocab_size})
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    save_weights(tmp_path / "model.safetensors", model.state_dict(), cfg, {"dataset": ds.fingerprint})
    scores = curriculum.document_scores(ds, str(tmp_path), 16)
    starts = ds.doc_starts("train")
    doc = torch.from_numpy(np.asarray(ds.tokens("train")[starts[0]:starts[0] + 17], dtype=np.int64))[None]
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(doc[:, :-1])[0][0], doc[0, 1:]).item()
    assert scores[0] == pytest.approx(want, rel=1e-5) and np.isfinite(scores).all()
    monkeypatch.setattr("slowrun.curriculum.load_model", lambda *a, **k: pytest.fail("the cache was not used"))
    assert np.array_equal(curriculum.document_scores(ds, str(tmp_path), 16), scores)
    monkeypatch.undo()
    # a cache file replaced (other scores, or a pickled object array) is not its hash: scored again
    (npy,) = tmp_path.glob("doc_scores-*.npy")
    for bad in (np.zeros_like(scores), np.array([{"x": 1}], dtype=object)):
        np.save(npy, bad, allow_pickle=True)
        assert np.array_equal(curriculum.document_scores(ds, str(tmp_path), 16), scores)


def test_disjoint_chunks_as_the_reference_loader(gpt2_ds):
    """data.chunking = disjoint: back-to-back seq_len+1 chunks of the epoch's document order, a
    shuffled multiple of epoch_multiple of them kept, and the epoch ends on the step the
    reference's loader ends it (the first step whose batch reaches past the epoch's chunks)."""
    ds = Dataset.open(gpt2_ds)
    T, m, bs = 64, 12, 8
    n = len(ds.tokens("train"))
    fixed = TrainLoader(ds, T, bs, seed=0, doc_shuffle=False, seq_shuffle=False, chunking="disjoint", epoch_multiple=m)
    assert fixed.seqs_per_epoch == n // (T + 1) // m * m < (n - 1) // T
    train = np.asarray(ds.tokens("train"))
    for i in (0, 1, fixed.seqs_per_epoch - 1):  # in file order: chunk i is tokens [65 i, 65 i + 65)
        assert np.array_equal(fixed.sequence(0, i), train[(T + 1) * i:(T + 1) * (i + 1)])
    loader = TrainLoader(ds, T, bs, seed=5, chunking="disjoint", epoch_multiple=m)
    for epoch in (0, 1):  # shuffled: each a distinct chunk of the doc-shuffled stream, none overlapping
        p = loader.plan(epoch)
        assert len(set(p.seq_order.tolist())) == loader.seqs_per_epoch and p.seq_order.max() < n // (T + 1)
        seqs = epoch_sequences(loader, epoch)
        assert sum(len(s) for s in seqs) == loader.seqs_per_epoch * (T + 1)
        assert not Counter(np.concatenate(seqs).tolist()) - Counter(train.tolist())
    # the steps on which epochs end: the reference detects the change after step s when its loader
    # (steps of bs sequences, accumulated 1 per optimizer step here) has served k epochs' chunks
    ends = []
    for step in range(1, 4 * loader.seqs_per_epoch // bs + 1):
        before = loader.epoch
        loader.next_batch()
        if loader.epoch != before:
            ends.append(step)
    S = loader.seqs_per_epoch
    assert ends == [min(s for s in range(1, 10_000) if s * bs >= k * S) for k in (1, 2, 3, 4)][: len(ends)]
    assert len(ends) >= 3
