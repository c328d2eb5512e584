"""Seconds per optimizer step: the batched Muon and foreach AdamW steps of src/slowrun/optim.py
against the per-parameter loops they replaced (the oracle in tests/test_optim.py), on the
`limited` recipe's model at reduced depth and width, with random gradients.

    OMP_NUM_THREADS=1 python benchmarks/optim_step.py [--n-embd 128 256 512] [--steps 9] [--out benchmarks/results/optim_step.json]

For each width, both paths step their own copy of the model with the same gradients,
interleaved step by step (so that a load from other processes falls on both alike); the
median of each is reported, with the largest parameter difference between the copies at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the oracle lives in the tests

from slowrun.config import build_config  # noqa: E402
from slowrun.gpt import GPT  # noqa: E402
from slowrun.optim import Muon, build_optimizers  # noqa: E402
from tests.test_optim import reference_adamw_step, reference_muon_step  # noqa: E402

PATHS = ("per_parameter", "batched")


def model_and_optimizers(args: argparse.Namespace, n_embd: int):
    cfg = build_config("limited", {"model.vocab_size": args.vocab_size, "model.n_layer": args.n_layer,
                                   "model.n_embd": n_embd, "model.n_head": args.n_head, "model.seq_len": 256,
                                   "model.short_window": 128, "model.mtp_weight": 0, "model.loop_start": -1,
                                   "model.loop_end": -1})
    torch.manual_seed(0)
    model = GPT(cfg.model).to(args.device)
    return model, build_optimizers(model, cfg.optim, torch.device(args.device))  # the groups' rates at their peaks


def measure(args: argparse.Namespace, n_embd: int) -> dict:
    """Both paths at one width: median seconds per step, whole and per optimizer."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    (new_model, new), (old_model, old) = model_and_optimizers(args, n_embd), model_and_optimizers(args, n_embd)
    params = list(new_model.parameters())
    kinds = [type(o).__name__ for o in new.optimizers]
    times: dict[str, dict[str, list[float]]] = {path: {k: [] for k in kinds} for path in PATHS}
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps + 1):
        grads = [(torch.randn(p.shape, generator=gen) * 1e-2).to(args.device) for p in params]
        for p, q, g in zip(params, old_model.parameters(), grads):
            p.grad, q.grad = g, g.clone()
        for path, opts in zip(PATHS, (old, new)):
            for kind, opt in zip(kinds, opts.optimizers):
                sync()
                t = time.perf_counter()
                if path == "batched":
                    opt.step()
                else:
                    (reference_muon_step if isinstance(opt, Muon) else reference_adamw_step)(opt)
                sync()
                if step > 0:  # the first step allocates the state
                    times[path][kind].append(time.perf_counter() - t)

    muon = next(o for o in new.optimizers if isinstance(o, Muon))
    shapes = sorted({(g["chunks"], tuple(p.shape)) for g in muon.param_groups for p in g["params"]})
    seconds = {path: {"total": statistics.median(map(sum, zip(*per.values()))),  # whole steps
                      **{k: statistics.median(v) for k, v in per.items()}} for path, per in times.items()}
    return {
        "n_embd": n_embd, "params": sum(p.numel() for p in params),
        "muon_matrices": sum(len(g["params"]) for g in muon.param_groups),
        "muon_shapes": [f"{r}x{c}" + (f" in {k} parts" if k > 1 else "") for k, (r, c) in shapes],
        "adamw_tensors": sum(len(g["params"]) for o in new.optimizers if o is not muon for g in o.param_groups),
        "ns_dtype": str(muon.param_groups[0]["ns_dtype"]),
        "seconds_per_step": seconds,
        "speedup": seconds["per_parameter"]["total"] / seconds["batched"]["total"],
        "max_param_diff": max((p - q).abs().max().item() for p, q in zip(params, old_model.parameters())),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=4, help="blocks (the recipe has 30)")
    ap.add_argument("--n-embd", type=int, nargs="+", default=[128, 256, 512], help="widths (the recipe has 1792)")
    ap.add_argument("--n-head", type=int, default=4, help="attention heads")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=9, help="timed steps of each path (after one untimed)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--note", default="", help="stored with the figures (e.g. what else ran on the machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optim_step.json"), help="JSON written here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    runs = []
    for n_embd in args.n_embd:
        r = measure(args, n_embd)
        runs.append(r)
        s = r["seconds_per_step"]
        print(f"n_embd {n_embd} ({r['params']:,} params, {r['muon_matrices']} Muon matrices, NS in {r['ns_dtype']}):")
        for path in PATHS:
            parts = ", ".join(f"{k} {v:.4f}" for k, v in s[path].items() if k != "total")
            print(f"  {path:>13}: {s[path]['total']:.4f} s/step ({parts})")
        print(f"  speedup {r['speedup']:.2f}x; largest parameter difference after {args.steps + 1} steps: "
              f"{r['max_param_diff']:.2e}")
    result = {
        "what": "seconds per optimizer step (median), per-parameter loops vs batched Muon / foreach AdamW",
        "model": {"recipe": "limited", "n_layer": args.n_layer, "n_head": args.n_head, "vocab_size": args.vocab_size,
                  "mtp_weight": 0},
        "device": args.device, "threads": args.threads, "steps": args.steps, "torch": torch.__version__,
        "runs": runs,
        "note": args.note,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
