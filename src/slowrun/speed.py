"""Training throughput: tokens/s, MFU and peak RSS of recipes, plus a plain minimal GPT loop.

    slowrun bench throughput                              # minimal, baseline, slowrun; fp32 + bf16
    slowrun bench throughput --recipes slowrun --dtypes bf16 --steps 5

Each measurement runs in its own process (so peak RSS is that configuration's alone) on
real batches of the builtin dataset, times `--steps` optimizer steps after `--warmup`
steps, and reports tokens/s, MFU against the peak matmul rate measured on this machine
(fp32 and bf16 separately), and peak RSS. A recipe's steps are the trainer's own
(`train.setup` + `train.fit`, timed by the trainer's `step_s`), so the benchmark times
what `slowrun train` runs. The `minimal` entry is a self-contained nanoGPT-style model
and AdamW loop at the same size and vocabulary as the `baseline` recipe: what a step
costs without the framework. Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import SlowrunError, distributed
from .config import build_config, parse_overrides
from .dataset import Dataset
from .evaluate import autocast
from .gpt import GPT
from .loader import TrainLoader
from .prepare import default_dataset
from .runlog import read_metrics
from .steps import step_plan
from .train import fit, setup



def peak_matmul_flops(dtype: torch.dtype, sizes=(512, 1024, 2048), reps: int = 10) -> float:
    """Best observed dense matmul rate (FLOP/s) over square sizes: the peak MFU is taken against."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


# ---------------------------------------------------------------------------------------
# the plain minimal GPT (what one would write without a framework)


class MinimalBlock(nn.Module):
    def __init__(self, C: int, H: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.H = H

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class MinimalGPT(nn.Module):
    def __init__(self, V: int, T: int, L: int, C: int, H: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(MinimalBlock(C, H) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, 0, 0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.blocks:
            x = b(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


# ---------------------------------------------------------------------------------------


def _minimal_step_times(cfg, ds, dtype: str, steps: int, warmup: int) -> tuple[list[float], int, int]:
    """Step times of the plain loop at the baseline's size: (times of the timed steps, params, FLOPs/token)."""
    T = cfg.model.seq_len
    loader = TrainLoader(ds, T, step_plan(cfg, ds.num_tokens("train")).seqs_per_step, seed=0)
    torch.manual_seed(0)
    dev = torch.device("cpu")
    m = cfg.model
    model = MinimalGPT(ds.vocab_size, T, m.n_layer, m.n_embd, m.n_head)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    model.train()
    times = []
    for i in range(warmup + steps):
        x, y = loader.next_batch()
        t = time.perf_counter()
        with autocast(dev, dtype):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    flops = GPT(cfg.model).flops_per_token()  # same architecture and size as the baseline recipe
    return times, sum(p.numel() for p in model.parameters()), flops


def _trainer_step_times(cfg, steps: int, warmup: int) -> tuple[list[float], int, int]:
    """Step times of the trainer itself (`train.setup` + `train.fit`, what `slowrun train` runs),
    read from the `step_s` of its metrics.jsonl: (times of the timed steps, params, FLOPs/token)."""
    env = distributed.init(cfg.train.device, cfg.train.dist_timeout_min)
    try:
        with tempfile.TemporaryDirectory(prefix="slowrun-speed-") as tmp:
            run = setup(cfg, Path(tmp) / "run", resume=False, force=False, echo=False, env=env)
            try:
                fit(run)
            finally:
                run.log.close()
            rows = read_metrics(Path(tmp) / "run")
    finally:
        distributed.shutdown(env)
    times = [r["step_s"] for r in rows if r.get("kind") == "train"][warmup:]
    return times, run.model.num_params(), run.model.flops_per_token()


def measure_one(recipe: str, dtype: str, steps: int, warmup: int, data: str, overrides: list[str]) -> dict:
    torch.set_flush_denormal(True)
    ds = Dataset.open(data)
    name = "baseline" if recipe == "minimal" else recipe
    # every step logged, nothing but steps inside the loop: no evaluation, no checkpoint but the last
    timing = {"train.max_steps": warmup + steps, "train.log_every": 1, "train.progress": False,
              "eval.every_steps": -1, "eval.at_epoch_end": False, "train.checkpoint_every": -1}
    cfg = build_config(name, {"train.device": "cpu", **parse_overrides(overrides), **timing, "data.path": str(ds.path),
                              "model.vocab_size": ds.vocab_size, "train.dtype": dtype})
    if recipe == "minimal":
        times, params, flops = _minimal_step_times(cfg, ds, dtype, steps, warmup)
    else:
        times, params, flops = _trainer_step_times(cfg, steps, warmup)
    dt = sorted(times)[len(times) // 2]  # median step time
    tok_s = cfg.train.batch_tokens / dt
    return {"recipe": recipe, "dtype": dtype, "params": params, "flops_per_token": flops, "batch_tokens": cfg.train.batch_tokens,
            "step_s_median": round(dt, 6), "tokens_per_s": round(tok_s, 1), "achieved_tflops": round(flops * tok_s / 1e12, 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


class SpeedError(SlowrunError):
    pass


def measure_in_process(recipe: str, dtype: str, steps: int, warmup: int, data: str, overrides: list[str]) -> dict:
    """`measure_one` in a process of its own (so its peak RSS is its own, and one measurement
    cannot warm or slow another); a failure is one line naming what was timed."""
    cmd = [sys.executable, "-m", "slowrun.speed", recipe, dtype, str(steps), str(warmup), data, *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise SpeedError(f"timing a step of {recipe} ({dtype}, {' '.join(overrides) or 'no overrides'}): "
                         f"{lines[-1] if lines else f'exit code {r.returncode}'}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(a: argparse.Namespace) -> dict:
    """Measure every (recipe, dtype) in its own process; print a table; write the JSON."""
    if a.data == "data/builtin":
        default_dataset(progress=False)
    overrides = [f"--{kv}" for kv in a.set]
    peaks = {"fp32": peak_matmul_flops(torch.float32), "bf16": peak_matmul_flops(torch.bfloat16)}
    print(f"peak matmul: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    rows = []
    for recipe in a.recipes:
        for dtype in a.dtypes:
            row = measure_in_process(recipe, dtype, a.steps, a.warmup, a.data, overrides)
            row["mfu"] = round(row["flops_per_token"] * row["tokens_per_s"] / peaks[dtype], 4)
            rows.append(row)
            print(f"{recipe:>9} {dtype}: {row['tokens_per_s']:>9,.0f} tok/s | MFU {row['mfu']:6.1%} | "
                  f"{row['achieved_tflops'] * 1000:6.1f} GFLOP/s | step {row['step_s_median']:.3f}s | peak RSS {row['peak_rss_mb']:,.0f} MB")
    by = {(r["recipe"], r["dtype"]): r["tokens_per_s"] for r in rows}
    ratios = {}
    for dtype in a.dtypes:
        if ("baseline", dtype) in by and ("minimal", dtype) in by:
            ratios[f"baseline_vs_minimal_{dtype}"] = round(by[("baseline", dtype)] / by[("minimal", dtype)], 3)
    for recipe in a.recipes:
        if (recipe, "bf16") in by and (recipe, "fp32") in by:
            ratios[f"{recipe}_bf16_vs_fp32"] = round(by[(recipe, "bf16")] / by[(recipe, "fp32")], 3)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    result = {"machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "peak_fp32_flops": peaks["fp32"], "peak_bf16_flops": peaks["bf16"]},
              "rows": rows, "ratios": ratios, "overrides": overrides}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":  # one measurement, in its own process: RECIPE DTYPE STEPS WARMUP DATA [--overrides]
    r, d, n, w, data, *over = sys.argv[1:]
    print(json.dumps(measure_one(r, d, int(n), int(w), data, over)))
