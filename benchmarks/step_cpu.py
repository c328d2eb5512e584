"""Seconds per training step on this CPU, by part, for the `limited` recipe at its full width
(1,792, 14 heads of 128) and sequence (2,048) with fewer blocks: the code as it was before the
speed work (a git ref, run from a worktree) against the code here, eager and compiled, and one
windowed attention layer dense vs flex (forward only: flex_attention has no backward on a CPU).
Writes benchmarks/results/step_cpu.json.

    OMP_NUM_THREADS=2 python benchmarks/step_cpu.py [--old-ref 96b2803] [--n-layer 2] [--steps 4]

Each configuration runs in a process of its own (the old code imported from its worktree's
src/), the same model shape, data and seed; the first step (allocation, compilation) is left out.
The vocabulary is 8,192 (with 2 blocks the real 50,257-row head would be most of the step; in
the 30-block model it is ~6%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(args) -> dict:
    return {"model.vocab_size": args.vocab, "model.n_layer": args.n_layer, "model.seq_len": args.seq_len,
            "model.short_window": args.seq_len // 2, "model.dropout": 0.0, "model.stoch_depth": 0.0,
            "model.mtp_weight": 0.0, "model.loop_start": -1, "model.loop_end": -1}


def worker(args) -> dict:
    """One configuration, in this process: median seconds of forward+backward and optimizer."""
    import torch

    from slowrun.config import build_config
    from slowrun.evaluate import autocast
    from slowrun.gpt import GPT
    from slowrun.optim import build_optimizers

    torch.set_num_threads(args.threads)
    cfg = build_config("limited", overrides(args))
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    opt = build_optimizers(model, cfg.optim, torch.device("cpu"))
    fwd = torch.compile(model) if args.variant == "compiled" else model
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    parts: dict[str, list[float]] = {"fwd_bwd_s": [], "opt_s": []}
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), "bf16"):
            _, loss = fwd(x, y, return_logits=False)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        if step > 0:
            parts["fwd_bwd_s"].append(t1 - t0)
            parts["opt_s"].append(t2 - t1)
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["step_s"] = out["fwd_bwd_s"] + out["opt_s"]
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def attention(args) -> dict:
    """One windowed attention layer's forward at the full shape: dense band vs flex block mask."""
    import torch
    import torch.nn.functional as F

    from torch.nn.attention.flex_attention import flex_attention

    from slowrun.gpt import band_mask, window_mask

    flex = torch.compile(flex_attention, dynamic=False)  # its fused kernel (slowrun runs it eagerly on a CPU)

    torch.set_num_threads(args.threads)
    T, W = args.seq_len, args.seq_len // 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, 14, T, 128, generator=g) for _ in range(3))
    dense, block = band_mask(T, W, torch.device("cpu")), window_mask(T, W, torch.device("cpu"), "flex")
    out = {}
    for name, fn in (("dense_band_fwd_s", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
                     ("flex_band_fwd_s", lambda: flex(q, k, v, block_mask=block)),
                     ("causal_full_fwd_s", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))):
        with torch.no_grad():
            fn()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def run(args, src: Path, variant: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", variant, "--n-layer", str(args.n_layer), "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--vocab", str(args.vocab),
           "--threads", str(args.threads)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-ref", default="96b2803", help="the code before the speed work (git ref)")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one untimed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cpu.json"))
    ap.add_argument("--worker", choices=["eager", "compiled", "attention"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.variant = args.worker
        print(json.dumps(attention(args) if args.worker == "attention" else worker(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old_ref],
                       check=True, capture_output=True)
        try:
            results = {"before_eager": run(args, old / "src", "eager"),
                       "after_eager": run(args, ROOT / "src", "eager"),
                       "after_compiled": run(args, ROOT / "src", "compiled"),
                       "attention_after": run(args, ROOT / "src", "attention")}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    out = {"shape": {"n_layer": args.n_layer, "n_embd": 1792, "n_head": 14, "seq_len": args.seq_len,
                     "batch_seqs": args.batch, "vocab": args.vocab}, "threads": args.threads, "old_ref": args.old_ref,
           "results": results, "note": "bf16 autocast on the CPU; attention forward only (flex has no CPU backward)"}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
