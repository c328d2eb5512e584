import math

import numpy as np
import torch
import torch.nn.functional as F

from slowrun.evaluate import (chunk_batches, evaluate, evaluate_averaged, num_chunks, prob_average, summarize,
                              target_byte_counts, target_logprobs)


class Bigram(torch.nn.Module):
    """A model whose log-probabilities are known in closed form."""

    def __init__(self, V):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(V, V))

    def forward(self, idx, targets=None):
        return self.table[idx], None


def test_loss_and_bpb_computed_another_way():
    V, T = 11, 8
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, 100).astype(np.uint16)
    token_bytes = rng.integers(0, 4, V)
    m = Bigram(V)
    r = evaluate(m, tokens, T, token_bytes, batch_seqs=3)
    n = len(tokens) // (T + 1)
    assert n == num_chunks(len(tokens), T) == 11 and r.targets == n * T
    logp = torch.log_softmax(m.table, dim=-1).detach().numpy()
    nats, nbytes = 0.0, 0
    for c in range(n):  # non-overlapping chunks of T+1 tokens, T targets each
        chunk = tokens[c * (T + 1):(c + 1) * (T + 1)]
        for a, b in zip(chunk[:-1], chunk[1:]):
            nats -= logp[a, b]
            nbytes += token_bytes[b]
    assert math.isclose(r.loss, nats / (n * T), rel_tol=1e-6)
    assert math.isclose(r.bpb, nats / math.log(2) / nbytes, rel_tol=1e-6)


def test_chunks_are_consecutive_and_capped():
    tokens = np.arange(1000)
    chunks = np.concatenate(list(chunk_batches(tokens, 9, 4)))
    assert chunks.shape == (100, 10) and np.array_equal(chunks.reshape(-1), tokens)
    assert np.concatenate(list(chunk_batches(tokens, 9, 4, max_tokens=50))).shape == (5, 10)


def test_target_logprobs_match_cross_entropy():
    V, T = 13, 6
    tokens = np.random.default_rng(1).integers(0, V, 70)
    m = Bigram(V)
    lp = target_logprobs(m, tokens, T, batch_seqs=2)
    x = torch.tensor(tokens[: 10 * 7].reshape(10, 7))
    ce = F.cross_entropy(m.table[x[:, :-1]].reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
    assert np.allclose(-lp, ce.detach().numpy(), atol=1e-6)


def test_probability_average():
    a, b = np.log([0.5, 0.1]), np.log([0.1, 0.3])
    assert np.allclose(np.exp(prob_average([a, b])), [0.3, 0.2])
    assert np.allclose(np.exp(prob_average([a, b], np.array([0.75, 0.25]))), [0.4, 0.15])


def test_evaluate_averaged_is_the_probability_average():
    V, T = 11, 8
    rng = np.random.default_rng(2)
    tokens, token_bytes = rng.integers(0, V, 200), rng.integers(1, 4, V)
    a, b = Bigram(V), Bigram(V)
    with torch.no_grad():
        b.table.mul_(-1)
    assert evaluate_averaged(iter([a]), tokens, T, token_bytes) == evaluate(a, tokens, T, token_bytes)
    both = evaluate_averaged(iter([a, b]), tokens, T, token_bytes, max_tokens=90)
    lp = prob_average([target_logprobs(m, tokens, T, max_tokens=90) for m in (a, b)])
    assert both == summarize(lp, target_byte_counts(tokens, T, token_bytes, max_tokens=90)) and both.targets == 10 * T


SHARDED = """
import json, sys
import numpy as np, torch
from slowrun import distributed
from slowrun.config import build_config
from slowrun.evaluate import evaluate, target_logprobs
from slowrun.gpt import GPT

env = distributed.init("cpu")  # gloo under torchrun
torch.manual_seed(0)
model = GPT(build_config("slowrun", {"model.vocab_size": 61, "model.depth": -1, "model.seq_len": 16, "model.n_layer": 2,
                                     "model.n_head": 2, "model.n_embd": 32}).model)
tokens = np.random.default_rng(0).integers(0, 61, 3000)
token_bytes = np.arange(61) % 4 + 1
r = evaluate(model, tokens, 16, token_bytes, batch_seqs=4, env=env)  # 176 chunks: 44 batches, 22 per rank
lp = target_logprobs(model, tokens, 16, batch_seqs=4, env=env)
json.dump({"loss": r.loss, "bpb": r.bpb, "targets": r.targets, "bytes": r.bytes, "lp": lp.tolist()},
          open(f"{sys.argv[1]}/rank{env.rank}.json", "w"))
distributed.shutdown(env)
"""


def test_sharded_evaluation_over_two_gloo_ranks_equals_one_rank(tmp_path):
    import json
    import os
    import subprocess

    from slowrun.jobs import torchrun

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    r = subprocess.run([*torchrun(2), str(script), str(tmp_path)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns the same result
    # one process, no sharding: the same model and tokens
    from slowrun.config import build_config
    from slowrun.gpt import GPT

    torch.manual_seed(0)
    model = GPT(build_config("slowrun", {"model.vocab_size": 61, "model.depth": -1, "model.seq_len": 16, "model.n_layer": 2,
                                         "model.n_head": 2, "model.n_embd": 32}).model)
    tokens = np.random.default_rng(0).integers(0, 61, 3000)
    one = evaluate(model, tokens, 16, np.arange(61) % 4 + 1, batch_seqs=4)
    assert (ranks[0]["targets"], ranks[0]["bytes"]) == (one.targets, one.bytes)
    assert abs(ranks[0]["loss"] - one.loss) < 1e-6 and abs(ranks[0]["bpb"] - one.bpb) < 1e-6
    lp_one = target_logprobs(model, tokens, 16, batch_seqs=4)
    assert np.all(np.array(ranks[0]["lp"]) != 0)  # every target was scored by some rank
    assert np.allclose(np.array(ranks[0]["lp"]), lp_one, atol=1e-6, rtol=0)


def test_reference_val_protocol_equals_the_reference_loader(bpe_ds):
    """eval.reference_batch scores what the reference's val loader scores: its (T+1)-token
    chunks permuted by RandomState(42), `EVAL_TOKENS // (B * T * world)` steps of world x B
    sequences, the loss the mean CE over every target (computed here the reference's way)."""
    from slowrun.config import build_config
    from slowrun.dataset import Dataset
    from slowrun.evaluate import scored_tokens, split_tokens
    from slowrun.gpt import GPT

    ds = Dataset.open(bpe_ds)
    T, B, world = 32, 2, 3
    val = np.asarray(ds.tokens("val"), dtype=np.int64)
    torch.manual_seed(0)
    model = GPT(build_config("slowrun", {"model.vocab_size": ds.vocab_size, "model.seq_len": T, "model.depth": -1, "model.n_layer": 2,
                                         "model.n_head": 2, "model.n_embd": 32, "model.dropout": 0.0}).model).eval()
    n = len(val) // (T + 1)
    chunks = val[: n * (T + 1)].reshape(n, T + 1)
    order = np.random.RandomState(42).permutation(n)
    steps = len(val) // (B * T * world)
    assert n % (B * world) != 0 and steps * B * world == n - n % (B * world)  # some chunks are dropped
    total, count = 0.0, 0
    with torch.no_grad():
        for step in range(steps):
            for rank in range(world):
                idx = order[(step * world + rank) * B: (step * world + rank + 1) * B]
                x = torch.from_numpy(chunks[idx])
                logits, _ = model(x[:, :-1])
                total += F.cross_entropy(logits.double().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
                count += x[:, 1:].numel()
    ours = evaluate(model, scored_tokens(val, T, B * world), T, ds.token_bytes)
    assert ours.targets == count and abs(ours.loss - total / count) < 1e-4
    assert evaluate(model, val, T, ds.token_bytes).targets == n * T  # default: every chunk
    assert len(split_tokens(ds, "test", T, B * world)) == ds.num_tokens("test")  # only val follows the reference
