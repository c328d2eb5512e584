"""The reference recipes trained compiled (inductor on CPU): no graph break, only the
recompiles a change of architecture explains, and the eager run's losses.

What may recompile, and why: the model's forward is compiled once per architecture it runs.
The trainer switches the looped span on at model.loop_from_epoch (more block calls: a new
graph) and a window-schedule stage changes every short block's window and the RoPE tables
(new band masks and YaRN's scale: a new graph); nothing else may. Dropout and stochastic
depth draw inside one graph (inductor takes eager's random stream with fallback_random, so
the two runs see the same masks); the band masks are built outside the graph
(GPT.prepare_attention) and the fused output layer is traced into it.

The 2-hour recipe runs by default (the 1-hour architecture plus the window schedule); the
1-hour and tiny recipes are `slow` (a minute of compilation each on two cores), as is the 2-hour
recipe with its blocks compiled apart (train.compile_scope = blocks). With blocks apart a sharded
run's reduces start during the backward; with the whole model compiled, only after it.
"""

import json

import pytest

from slowrun.config import build_config
from slowrun.train import train

STEPS_PER_EPOCH = 15  # 4,096 training tokens in 32-token windows, 8 per step: 127 / 8
SEQS_PER_EPOCH, BATCH_SEQS, MICRO = 127, 8, 2


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory, prepare_dataset):
    return prepare_dataset(tmp_path_factory.mktemp("data") / "small", tokenizer="bpe:512", train_tokens=4096,
                           val_tokens=2048, test_tokens=2048)


def config(recipe, data, compile, **over):
    return build_config(recipe, {
        "data.path": str(data), "model.n_layer": 4, "model.n_embd": 64, "model.n_head": 2, "model.seq_len": 32,
        "model.short_window": 8, "model.loop_start": 2, "model.loop_end": 2, "model.loop_from_epoch": 2,
        "train.batch_tokens": 256, "train.micro_batch_tokens": 128, "train.max_steps": 3 * STEPS_PER_EPOCH,
        "train.epochs": 3, "train.compile": compile, "train.dtype": "fp32", "train.epoch_snapshots": 0,
        "train.save_final": False, "train.num_threads": 1, "train.progress": False, "eval.max_tokens": 256,
        "eval.reference_batch": -1, "eval.at_epoch_end": False, "eval.test": False, "optim.swa_epochs": 0,
        "optim.lr_scale": 0.1,  # at full rate fp32 rounding differences grow ~10x per 10 steps; here they stay put
        "data.chunking": "stride", "data.epoch_multiple": 1, **over})


def run(recipe, data, tmp, compile, **over):
    cfg = config(recipe, data, compile, **over)
    d = tmp / ("compiled" if compile else "eager")
    train(cfg, d, echo=False)
    return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def compiled_run(recipe, data, tmp, monkeypatch, **over):
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    import slowrun.optim

    monkeypatch.setattr(slowrun.optim, "fast_bf16_available", lambda device: False)  # Muon in fp32 in both runs
    eager = run(recipe, data, tmp, False, **over)
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):  # eager's random stream for dropout
        compiled = run(recipe, data, tmp, True, **over)
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return eager, compiled, breaks, graphs


def skipping_steps(cfg):
    """Steps where stochastic depth skips a block in some micro-batch. Eager does not run a
    skipped block, so its dropout draws are not taken and the rest of that step's dropout masks
    differ from the compiled run's, which runs it scaled by 0 (`GPT.hidden`); the next step
    reseeds, so only these steps differ by more than rounding."""
    from slowrun.gpt import loop_active_at, stoch_depth_scales

    out = set()
    for step in range(3 * STEPS_PER_EPOCH):
        looped = loop_active_at(cfg.model, step * BATCH_SEQS // SEQS_PER_EPOCH)
        scales = [stoch_depth_scales(cfg.model, cfg.train.seed, step, looped, micro=i) for i in range(MICRO)]
        if any(s is not None and (s == 0).any() for s in scales):
            out.add(step)
    return out


def assert_equal_losses(eager, compiled, cfg, rtol=1e-4):
    assert len(eager) == len(compiled) == 3 * STEPS_PER_EPOCH
    skipping = skipping_steps(cfg)
    assert cfg.model.stoch_depth == 0 or 0 < len(skipping) < len(eager) // 2  # the check below has steps to check
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert abs(a - b) <= (1e-3 if step in skipping else rtol) * abs(a), (step, a, b)


def test_two_hour_compiles_once_per_architecture_with_eager_losses(small_ds, tmp_path, monkeypatch):
    # epoch 1: stage 1 windows; epoch 2: stage 2 (wider windows, YaRN); epoch 3: the loop switched on
    eager, compiled, breaks, graphs = compiled_run("two_hour", small_ds, tmp_path, monkeypatch,
                                                   **{"model.window_schedule": "1-1:4,8;2-3:8,32"})
    assert breaks == 0
    assert graphs == 3  # the first stage; the second stage; the second stage looped
    assert_equal_losses(eager, compiled, config("two_hour", small_ds, True, **{"model.window_schedule": "1-1:4,8;2-3:8,32"}))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["limited", "tiny"])
def test_limited_and_tiny_compile_once_per_architecture_with_eager_losses(recipe, small_ds, tmp_path, monkeypatch):
    eager, compiled, breaks, graphs = compiled_run(recipe, small_ds, tmp_path, monkeypatch)
    assert breaks == 0
    assert graphs == 2  # before and after the loop switch
    # tiny's rates (its head and scalars) amplify fp32 rounding steadily even at 0.1x: measured 1e-7 at
    # step 0, 1e-5 at 18, 1.1e-4 at 31, a plateau of 1.6e-4 through the warmdown
    assert_equal_losses(eager, compiled, config(recipe, small_ds, True), rtol=1e-4 if recipe == "limited" else 3e-4)


OVERLAP_SCRIPT = """
import json, sys
import torch
from slowrun import distributed
from slowrun.config import build_config
from slowrun.gpt import GPT

env = distributed.init("cpu")
torch.manual_seed(0)
cfg = build_config("smoke", {"model.n_layer": 4, "model.n_embd": 128, "model.n_head": 2, "model.vocab_size": 512,
                             "model.seq_len": 128}).model
out = {}
for scope in ("model", "blocks"):
    model = GPT(cfg)
    shard = distributed.ShardedStep(list(model.parameters()), env)
    if scope == "blocks":
        model.compile_blocks("aot_eager")
        fwd = model
    else:
        fwd = torch.compile(model, backend="aot_eager")
    x = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(env.rank))
    for _ in range(3):  # the first call compiles
        shard.arm()
        _, loss = fwd(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        shard.reduce_grads()
        model.zero_grad()
    out[scope] = [shard.overlapped, len(shard.buckets), shard.overlap_left]
if env.is_main:
    print(json.dumps(out))
distributed.shutdown(env)
"""


def test_blocks_compiled_apart_reduce_while_the_backward_runs_and_a_whole_model_graph_does_not(tmp_path):
    """train.compile_scope: with the whole model one compiled graph, every gradient is handed over
    when the graph's backward ends, so train.shard_optimizer's buckets are all sent then (~0% of
    the backward left); with each block compiled apart, a block's buckets are sent as its backward
    ends, while the earlier blocks' backward still runs. Two gloo ranks, aot_eager (the autograd
    structure inductor would build, without code generation)."""
    import os
    import subprocess

    from slowrun.jobs import torchrun

    script = tmp_path / "overlap.py"
    script.write_text(OVERLAP_SCRIPT)
    r = subprocess.run([*torchrun(2), str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-8000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    sent, buckets, left = out["model"]
    # measured (host time): 0.3% of the backward left on average with the whole model, 17% with
    # blocks apart (the token table's bucket, the last gradient, is sent at 0% in both)
    assert sent == buckets and left < 0.05, out  # sent from the hooks, but only once the whole graph is done
    sent, buckets, left = out["blocks"]
    assert sent == buckets and left > 0.1, out  # spread over the backward


@pytest.mark.slow  # 30 s on two cores
def test_two_hour_with_blocks_compiled_apart_has_one_graph_per_block_configuration_and_eager_losses(
        small_ds, tmp_path, monkeypatch):
    """train.compile_scope = blocks (aot_eager: the graphs without code generation). Blocks of one
    configuration share a graph: at 4 blocks and the MTP block, stage 1 has windows 4 (with and
    without the value projection), 8 (with it) and the full-context MTP block: 4 graphs; stage 2
    (windows 8 and full, YaRN's scale): 4 more. Switching the loop on replays block 2, a known
    configuration: no new graph. The losses are eager's to the last bit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import slowrun.optim

    monkeypatch.setattr(slowrun.optim, "fast_bf16_available", lambda device: False)
    over = {"model.window_schedule": "1-1:4,8;2-3:8,32", "train.compile_scope": "blocks",
            "train.compile_backend": "aot_eager"}
    eager = run("two_hour", small_ds, tmp_path, False, **over)
    torch._dynamo.reset()
    counters.clear()
    compiled = run("two_hour", small_ds, tmp_path, True, **over)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 8
    torch._dynamo.reset()
    assert compiled == eager
