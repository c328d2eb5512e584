"""One stage of the GPU session (benchmarks/gpu_session.sh runs them in order, each under its own
timeout): every stage writes its JSON into --out the moment it ends, an error included, so a
stage that fails or runs out of time leaves the others' results.

  env        the machine: torch, CUDA, the device, flex_attention                 -> env.json
  attention  one windowed attention layer, forward + backward: SDPA with a dense
             band mask vs flex_attention on a block mask vs SDPA's causal kernel
             (the 1-hour track's shape: T 2048, 14 heads x 128, window 1024, bf16) -> attention.json
  limited    the `limited` recipe (1-hour track) at full size, compiled, loop off
             or on (--loop), a few steps of 8 micro-batches of 8,192 tokens:
             step time by part, tokens/s, MFU, peak memory beside `slowrun plan`'s
             estimate, graph breaks and recompiles                                 -> limited_loop_{off,on}.json
  summary    the 1-hour track's projected 8xH100 time from the two above, beside
             the record's 59.0 minutes                                              -> summary.json

--rehearse runs every stage at toy size on the CPU (float32, no flex backward: it has none
there), so that the script's first GPU run does not fail on anything but the GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense peak (SXM)
RECORD_MIN = 59.0  # the 1-hour track's record #20 (3.195), minutes on 8xH100
STAGES = ("env", "attention", "limited", "summary")


def finite(obj):
    """NaN and infinities as null: strict JSON (a CPU rehearsal has no peak FLOP/s, so no MFU)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return obj


def write(out: Path, name: str, obj: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    obj = finite(obj)
    (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"gpu_session: {name}: {json.dumps(obj)[:400]}", flush=True)


def device_of(rehearse: bool) -> torch.device:
    if rehearse:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --rehearse on a CPU)")
    return torch.device("cuda")


def peak_flops(dev: torch.device) -> float:
    if dev.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(dev)
    return 1e12 * next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0)


def stage_env(args, dev) -> dict:
    from slowrun.runlog import git_commit

    out = {"python": platform.python_version(), "torch": torch.__version__, "device": str(dev),
           "slowrun_commit": git_commit(), "rehearse": args.rehearse}
    out["flex_attention"] = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                   cuda=torch.version.cuda, capability=list(torch.cuda.get_device_capability(dev)))
    return out


def timed(fn, dev, reps: int) -> float:
    """Median seconds of fn() after one warm-up (synchronized on CUDA)."""
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stage_attention(args, dev) -> dict:
    from slowrun.gpt import band_mask, flex_attention, window_mask

    B, H, T, D, W = (1, 2, 256, 32, 128) if args.rehearse else (4, 14, 2048, 128, 1024)
    dtype = torch.float32 if args.rehearse else torch.bfloat16
    backward = dev.type == "cuda"  # flex_attention has no backward on CPU (nor a forward on inputs that need one)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g, requires_grad=backward) for _ in range(3))
    dense = band_mask(T, W, dev)
    block = window_mask(T, W, dev, "flex")

    def run(attend):
        def step():
            y = attend()
            if backward:
                y.float().square().mean().backward()
        return step

    kernels = {"sdpa_dense_band": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
               "flex_band": lambda: flex_attention(q, k, v, block, None),
               "sdpa_causal_full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    with torch.no_grad():
        ref = kernels["sdpa_dense_band"]()
        err = (kernels["flex_band"]() - ref).abs().max().item()
    out = {"shape": {"B": B, "H": H, "T": T, "D": D, "window": W}, "dtype": str(dtype), "backward": backward,
           "flex_max_abs_diff": err}
    for name, fn in kernels.items():
        out[f"{name}_ms"] = 1e3 * timed(run(fn), dev, args.reps)
    out["flex_speedup_vs_dense"] = out["sdpa_dense_band_ms"] / out["flex_band_ms"]
    return out


def limited_overrides(args, loop: bool) -> dict:
    over = {"data.path": args.data, "train.compile": True, "train.max_steps": args.steps, "train.epochs": 100,
            "train.batch_tokens": 8 * 8192, "train.micro_batch_tokens": 8192, "train.epoch_snapshots": 0,
            "train.save_final": False, "train.progress": False, "eval.at_epoch_end": False, "eval.test": False,
            "eval.max_tokens": 16384, "eval.reference_batch": -1, "optim.swa_epochs": 0, "optim.ema_decay": -1.0,
            "model.loop_from_epoch": 0 if loop else 10**6, "data.epoch_multiple": 1, "train.checkpoint_every": -1}
    if args.rehearse:  # toy size, same code path
        over.update({"model.n_layer": 4, "model.n_embd": 64, "model.n_head": 2, "model.seq_len": 64,
                     "model.short_window": 16, "model.loop_start": 1, "model.loop_end": 2, "train.batch_tokens": 8 * 128,
                     "train.micro_batch_tokens": 128, "train.dtype": "fp32", "eval.max_tokens": 256,
                     "train.num_threads": 2})
    return over


def stage_limited(args, dev) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from slowrun.config import build_config
    from slowrun.plan import plan
    from slowrun.train import train

    loop = args.loop
    over = limited_overrides(args, loop)
    cfg = build_config("limited", over)
    run_dir = Path(args.work) / f"limited-loop-{'on' if loop else 'off'}-{int(time.time())}"
    counters.clear()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.time()
    result = train(cfg, run_dir, echo=False)
    wall = time.time() - t
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"][2:]  # the first two compile
    med = lambda key: statistics.median(r[key] for r in steps) if steps else float("nan")
    step_s = med("step_s")
    tok_s = cfg.train.batch_tokens / step_s
    estimate = plan("limited", {k: v for k, v in over.items() if not k.startswith(("data.", "eval."))},
                    gpus=1, data=args.data, device=dev.type)
    return {"loop": loop, "params": result["params"], "flops_per_token": result["flops_per_token"],
            "steps_timed": len(steps), "step_s": step_s, "fwd_bwd_s": med("fwd_bwd_s"), "comm_s": med("comm_s"),
            "opt_s": med("opt_s"), "tokens_per_s": tok_s, "mfu": result["flops_per_token"] * tok_s / peak_flops(dev),
            "peak_gpu_mb": result.get("peak_gpu_mb"), "plan_peak_mb": round(estimate.peak_bytes / 2**20, 1),
            "graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"].get("unique_graphs", 0), "wall_s": wall, "batch_tokens": cfg.train.batch_tokens}


def stage_summary(args, dev) -> dict:
    """The 1-hour track on 8 GPUs: each rank steps 8 micro-batches of 8,192 tokens (524,288
    tokens a step), as measured here on one; its 2,097 steps run unlooped to epoch 6 and looped
    from epoch 7 of 11. Communication and evaluations are not in the figure (one GPU has none)."""
    from slowrun.config import build_config

    out = Path(args.out)
    parts = {k: json.loads((out / f"limited_loop_{k}.json").read_text()) for k in ("off", "on")}
    missing = [k for k, v in parts.items() if "error" in v]
    if missing:
        return {"error": f"no step time for loop {', '.join(missing)}"}
    cfg = build_config("limited")
    N, epochs = cfg.train.max_steps, round(cfg.train.epochs)
    looped = round(N * (epochs - cfg.model.loop_from_epoch) / epochs)
    minutes = ((N - looped) * parts["off"]["step_s"] + looped * parts["on"]["step_s"]) / 60
    return {"steps": N, "looped_steps": looped, "step_s_loop_off": parts["off"]["step_s"],
            "step_s_loop_on": parts["on"]["step_s"], "projected_8gpu_min": minutes, "record_min": RECORD_MIN,
            "mfu_loop_off": parts["off"]["mfu"], "mfu_loop_on": parts["on"]["mfu"], "target_mfu": 0.45,
            "note": "training steps only: no all-reduce (one GPU) and no evaluation in the projection"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--data", default="data/gpu-session", help="a prepared GPT-2-token dataset (gpu_session.sh prepares it)")
    ap.add_argument("--work", default="/tmp/slowrun-gpu-session", help="where the training stages write their runs")
    ap.add_argument("--loop", action="store_true", help="limited: with the looped span on")
    ap.add_argument("--steps", type=int, default=8, help="limited: optimizer steps (the first two compile)")
    ap.add_argument("--reps", type=int, default=10, help="attention: timed repetitions")
    ap.add_argument("--rehearse", action="store_true", help="toy sizes on the CPU")
    args = ap.parse_args(argv)
    out = Path(args.out)
    name = {"limited": f"limited_loop_{'on' if args.loop else 'off'}.json"}.get(args.stage, f"{args.stage}.json")
    t = time.time()
    try:
        dev = device_of(args.rehearse) if args.stage != "summary" else torch.device("cpu")  # summary reads files
        res = {"env": stage_env, "attention": stage_attention, "limited": stage_limited, "summary": stage_summary}[
            args.stage](args, dev)
    except Exception as e:  # the stage's failure is its result: the next stages still run
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    res["stage_s"] = round(time.time() - t, 1)
    write(out, name, res)
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
