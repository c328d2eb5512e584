"""Seconds per distillation step: the fused loss (the teacher's output-layer input and weights;
its logits and the student's computed a chunk of rows at a time, `losses.linear_distillation`)
against the unfused one (the teacher's whole (B, T, V) logits, the student's whole logits, two
full log-softmaxes), with a plain step beside them, on the CPU track's `slowrun` recipe (teacher
and student alike, as in the track's distilled entry), bf16 autocast, batch 2,048 tokens.

    OMP_NUM_THREADS=1 python benchmarks/distill_step.py [--steps 9] [--threads 1] [--out benchmarks/results/distill_step.json]

The three kinds of step are interleaved (so that a load from other processes falls on all
alike); each one's median is reported, and the two distillation losses' difference at the
first step (they compute the same function).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slowrun.config import build_config
from slowrun.gpt import GPT
from slowrun.losses import DistillTarget

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("plain", "distill_unfused", "distill_fused")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="slowrun")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=9, help="timed steps of each kind (after one untimed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = build_config(args.recipe, {"model.vocab_size": args.vocab_size})
    torch.manual_seed(0)
    student, teacher = GPT(cfg.model), GPT(cfg.model).eval()
    T = cfg.model.seq_len
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, args.vocab_size, (args.batch_tokens // T, T), generator=gen) for _ in range(2))
    a, temp = cfg.distill.alpha, cfg.distill.temperature

    def step(kind: str) -> float:
        with torch.autocast("cpu", torch.bfloat16):
            distill = None
            with torch.no_grad():
                if kind == "distill_unfused":
                    distill = DistillTarget(teacher(x)[0], a, temp)
                elif kind == "distill_fused":
                    distill = DistillTarget(None, a, temp, hidden=(teacher.norm_f(teacher.hidden(x)),),
                                            head=(teacher.head_weight,), softcap=(teacher.cfg.logit_softcap,))
            _, loss = student(x, y, return_logits=False, distill=distill)
        loss.backward()
        student.zero_grad()
        return loss.item()

    times: dict[str, list[float]] = {k: [] for k in KINDS}
    first = {k: step(k) for k in KINDS}  # untimed
    for _ in range(args.steps):
        for kind in KINDS:
            t = time.perf_counter()
            step(kind)
            times[kind].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "recipe": args.recipe, "vocab_size": args.vocab_size, "batch_tokens": args.batch_tokens,
        "threads": args.threads, "steps": args.steps, "torch": torch.__version__,
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "fused_speedup": round(med["distill_unfused"] / med["distill_fused"], 3),
        "fused_over_plain": round(med["distill_fused"] / med["plain"], 3),
        "loss_difference": abs(first["distill_fused"] - first["distill_unfused"]),
    }
    for k in KINDS:
        print(f"{k:<16} {med[k] * 1000:8.0f} ms per step")
    print(f"fused distillation: {result['fused_speedup']:.2f}x the unfused one's speed, "
          f"{result['fused_over_plain']:.2f}x a plain step's time; loss difference {result['loss_difference']:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
