"""Seconds per training step with the fused output layer's elementwise kernel compiled
(train.compile_loss, the default) and run eagerly, on the CPU track's `slowrun` recipe (bf16
autocast, batch 2,048 tokens, vocabulary 8,192), for a plain step and a distillation step (one
teacher, the fused loss), each at the given depths; and one (256, V) chunk's kernel alone.

    python benchmarks/loss_kernel.py [--threads 1,2] [--depths 4,6] [--steps 9] [--out benchmarks/results/loss_kernel.json]

A step is forward, backward and the optimizer's step. The two settings are interleaved step by
step (so that a load from other processes falls on both alike); each one's median is reported,
with the loss of the same weights under each (the same function: equal to rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slowrun import losses
from slowrun.config import build_config
from slowrun.gpt import GPT
from slowrun.losses import DistillTarget
from slowrun.optim import build_optimizers

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 2)


def chunk_kernel(vocab: int, steps: int) -> dict:
    """The CE kernel alone on one chunk of raw bf16 logits, eager and compiled."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(256, vocab, generator=g) * 3).bfloat16()
    y = torch.randint(0, vocab, (256,), generator=g)
    out = {}
    for name, on in (("eager_ms", False), ("compiled_ms", True)):
        losses.compile_kernels(on)
        out[name] = median_ms(lambda: losses._run_kernel(losses._ce_rows, z, y, 15.0), steps)
    losses.compile_kernels(True)
    return out


def steps_at(depth: int, args) -> dict:
    cfg = build_config(args.recipe, {"model.vocab_size": args.vocab_size, "model.depth": depth})
    torch.manual_seed(0)
    model, teacher = GPT(cfg.model), GPT(cfg.model).eval()
    opt = build_optimizers(model, cfg.optim, torch.device("cpu"))
    T = cfg.model.seq_len
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, args.vocab_size, (args.batch_tokens // T, T), generator=gen) for _ in range(2))
    a, temp = cfg.distill.alpha, cfg.distill.temperature

    def step(distill: bool, update: bool = True) -> float:
        with torch.autocast("cpu", torch.bfloat16):
            target = None
            if distill:
                with torch.no_grad():
                    target = DistillTarget(None, a, temp, hidden=(teacher.norm_f(teacher.hidden(x)),),
                                           head=(teacher.head_weight,), softcap=(teacher.cfg.logit_softcap,))
            _, loss = model(x, y, return_logits=False, distill=target)
        loss.backward()
        if update:
            opt.step()
        opt.zero_grad()
        return loss.item()

    out = {"params": sum(p.numel() for p in model.parameters())}
    for kind in ("plain", "distill"):
        times: dict[str, list[float]] = {"compiled": [], "eager": []}
        first = {}
        for name in times:  # the same weights: the same loss (the first call also builds the kernel)
            losses.compile_kernels(name == "compiled")
            torch.manual_seed(2)  # the same dropout
            first[name] = step(kind == "distill", update=False)
        for _ in range(args.steps):
            for name in times:
                losses.compile_kernels(name == "compiled")
                t = time.perf_counter()
                step(kind == "distill")
                times[name].append(time.perf_counter() - t)
        losses.compile_kernels(True)
        c, e = (round(statistics.median(times[n]) * 1e3, 1) for n in ("compiled", "eager"))
        out[kind] = {"compiled_ms": c, "eager_ms": e, "speedup": round(e / c, 3),
                     "tokens_per_s_compiled": round(args.batch_tokens / c * 1e3), "first_loss": first}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="slowrun")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--depths", default="4,6", help="model depths (n_embd = 64 x depth), comma-separated")
    ap.add_argument("--steps", type=int, default=9, help="timed steps of each setting (after one untimed)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (the CPU track trains at 2, its sweeps at 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loss_kernel.json"))
    args = ap.parse_args(argv)
    result = {"recipe": args.recipe, "batch_tokens": args.batch_tokens, "vocab_size": args.vocab_size,
              "torch": torch.__version__, "threads": {}}
    for threads in (int(n) for n in args.threads.split(",")):
        torch.set_num_threads(threads)
        result["threads"][str(threads)] = {"chunk_256": chunk_kernel(args.vocab_size, 4 * args.steps),
                                           "depths": {d: steps_at(int(d), args) for d in args.depths.split(",")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
