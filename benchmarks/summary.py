"""Markdown tables of the CPU track's results, for the README and notes.

    python benchmarks/summary.py [benchmarks/results/cpu_track.json]

Every number printed is read from the results file; nothing is computed here but ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slowrun.track import describe_efficiency as eff


def main(path: str = "benchmarks/results/cpu_track.json") -> None:
    r = json.loads(Path(path).read_text())
    c = r["baseline_curve"]
    print("Baseline curve (`baseline` recipe, one epoch, chosen by val loss):\n")
    print("| budget | train tokens | runs in grid | chosen point | val loss | test loss |")
    print("|---|---|---|---|---|---|")
    for b, tokens in zip(c["budgets"], c["tokens"]):
        pts = [p for p in c["points"] if p["budget"] == b]
        done = [p for p in pts if p.get("val_loss") is not None]
        best = min(done, key=lambda p: p["val_loss"])
        point = ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in best["point"].items())
        print(f"| {b:g}x | {tokens:,} | {len(done)} | {point} | {best['val_loss']:.3f} | {best['test_loss']:.3f} |")
    print("\nEntries (test loss of the variant chosen on val; efficiency on the curve above):\n")
    print("| entry | members | test loss | test bpb | val loss | efficiency | wall (min) |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("single", "ensemble", "distill"):
        if kind not in r:
            continue
        s = r[kind]
        name = {"single": "single model", "ensemble": "ensemble, prob. average",
                "distill": "chain-distilled ensemble, prob. average"}[kind]
        print(f"| {name} | {s['members']} | {s['test_loss']:.4f} | {s['test_bpb']:.4f} | {s['val_loss']:.4f} | "
              f"{eff(s)} | {s['wall_s'] / 60:.1f} |")
    for kind in ("ensemble", "distill"):
        if kind not in r:
            continue
        s = r[kind]
        print(f"\n{kind}: per K (probability average of the first k members) and per method:\n")
        print("| k | test loss | efficiency |")
        print("|---|---|---|")
        for row, e in zip(s["per_k"], s.get("efficiency_by_k", [{}] * len(s["per_k"]))):
            print(f"| {row['k']} | {row['probs_test_loss']:.4f} | {eff(e)} |")
        print("\n| method | test loss | efficiency |")
        print("|---|---|---|")
        for name, m in s["methods"].items():
            if "test_loss" in m:
                print(f"| {name} | {m['test_loss']:.4f} | {eff(s.get('efficiency_by_method', {}).get(name, {}))} |")
    if "throughput" in r:
        t = r["throughput"]
        print("\nThroughput (batch of 16,384 tokens for every recipe; median step):\n")
        print("| recipe | dtype | tokens/s | MFU | peak RSS (MB) |")
        print("|---|---|---|---|---|")
        for row in t["rows"]:
            print(f"| {row['recipe']} | {row['dtype']} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} | "
                  f"{row['peak_rss_mb']:,.0f} |")
        print("\n" + ", ".join(f"{k}: {v:.2f}x" for k, v in t["ratios"].items()))
    if "memory" in r:
        print("\nPeak RSS (MB): " + ", ".join(f"{k} {v:,}" for k, v in r["memory"].items() if k.endswith("_mb")))


if __name__ == "__main__":
    main(*sys.argv[1:])
