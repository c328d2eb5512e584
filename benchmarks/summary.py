"""Markdown tables of the CPU track's results, for the README and notes.

    python benchmarks/summary.py [benchmarks/results/cpu_track.json]
    python benchmarks/summary.py --ledger [benchmarks/results/ledger.jsonl]   (every finished curve run so far)
    python benchmarks/summary.py --ablation [benchmarks/results/ablation_cpu.json]   (an ablation's table)

Every number printed is read from the results file; nothing is computed here but ratios. The ledger's and
the ablations' tables are slowrun.docgen's, which writes them into docs/cpu-track.md.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from slowrun.docgen import ablation_table, curve_table, ledger_rows, runs_table
from slowrun.efficiency import describe_efficiency as eff
from slowrun.efficiency import describe_fit
from slowrun.report import entry_label


def _point(p: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in p.items())


def main(path: str = "benchmarks/results/cpu_track.json") -> None:
    r = json.loads(Path(path).read_text())
    c = r["baseline_curve"]
    print(f"Baseline curve (`{c.get('recipe', 'baseline')}` recipe, one epoch, chosen by val loss; "
          f"the curve's loss is the mean over the chosen point's seeds):\n")
    print("| budget | train tokens | sizes run (depth) | chosen point | params | seeds | val loss | test loss | test spread |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ch, tokens in zip(c["chosen"], c["tokens"]):
        pts = [p for p in c["points"] if p["budget"] == ch["budget"] and p.get("val_loss") is not None]
        depths = sorted({p["point"]["model.depth"] for p in pts if "model.depth" in p["point"]})
        spread = f"{ch['test_spread']:.4f}" if ch.get("seeds", 1) > 1 else "-"
        notes = (" (refined)" if "refined_from" in ch else "") + (" (AT EDGE)" if "at_edge" in ch else "")
        print(f"| {ch['budget']:g}x | {tokens:,} | {', '.join(map(str, depths))} | {_point(ch['point'])}{notes} | "
              f"{ch['params']:,} | {ch.get('seeds', 1)} | {ch['val_loss']:.4f} | {ch['test_loss']:.4f} | {spread} |")
    print("\nEvery point (val / test loss):\n")
    print("| budget | point | phase | params | val loss | test loss | device | wall (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for p in sorted(c["points"], key=lambda p: (p["budget"], p.get("params") or 0, json.dumps(p["point"]))):
        if p.get("val_loss") is None:
            print(f"| {p['budget']:g}x | {_point(p['point'])} | {p.get('phase', 'grid')} | - | not run | | | |")
            continue
        print(f"| {p['budget']:g}x | {_point(p['point'])} | {p.get('phase', 'grid')} | {p['params']:,} | "
              f"{p['val_loss']:.4f} | {p['test_loss']:.4f} | {p.get('device') or '-'} | {p['wall_s'] / 60:.1f} |")
    for b, why in c.get("pending", {}).items():
        print(f"\n{b}: not in the curve yet ({why})")
    if "fit" in c:
        print(f"\nPower-law fit of the curve: {describe_fit(c['fit'])}")
    if "gpt2_curve" in r:
        g = r["gpt2_curve"]
        print(f"\nSecond comparator: {g['name']} ({g['file']}), test loss "
              + ", ".join(f"{t:,}: {x:.3f}" for t, x in zip(g["tokens"], g["losses"]["test"]))
              + (f"; power-law fit: {describe_fit(g['fit'])}" if "fit" in g else ""))
    print("\nEntries (test loss of the variant chosen on val; efficiency on the curve above, and on the GPT-2 curve):\n")
    print("| entry | members | test loss | test bpb | val loss | efficiency | on GPT-2 curve | wall (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("single", "ensemble", "distill"):
        if kind not in r:
            continue
        s = r[kind]
        name = entry_label(kind, s) + (", prob. average" if kind != "single" else "")
        print(f"| {name} | {s['members']} | {s['test_loss']:.4f} | {s['test_bpb']:.4f} | {s['val_loss']:.4f} | "
              f"{eff(s)} | {eff(s.get('efficiency_second', {}))} | {s['wall_s'] / 60:.1f} |")
    for kind in ("ensemble", "distill"):
        if kind not in r:
            continue
        s = r[kind]
        print(f"\n{kind}: per K (probability average of the first k members) and per method:\n")
        second = s.get("efficiency_second", {})
        print("| k | test loss | efficiency | on GPT-2 curve |")
        print("|---|---|---|---|")
        for i, row in enumerate(s["per_k"]):
            e, e2 = s.get("efficiency_by_k", [{}] * (i + 1))[i], second.get("by_k", [{}] * (i + 1))[i]
            print(f"| {row['k']} | {row['probs_test_loss']:.4f} | {eff(e)} | {eff(e2)} |")
        print("\n| method | test loss | efficiency | on GPT-2 curve |")
        print("|---|---|---|---|")
        for name, m in s["methods"].items():
            if "test_loss" in m:
                print(f"| {name} | {m['test_loss']:.4f} | {eff(s.get('efficiency_by_method', {}).get(name, {}))} | "
                      f"{eff(second.get('by_method', {}).get(name, {}))} |")
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


def ledger(path: str = "benchmarks/results/ledger.jsonl") -> None:
    """Every run in the ledger, by budget and size, then each curve recipe's best per budget so far
    (the tables docs/cpu-track.md holds, from `python -m slowrun.docgen`)."""
    rows = ledger_rows(path)
    print(runs_table(rows))
    print()
    print(curve_table(rows))


def ablation(path: str = "benchmarks/results/ablation_cpu.json") -> None:
    """An ablation.json of `slowrun ablate`: the full recipe, then each technique left out or swap."""
    print(ablation_table(path))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `summary.py ... | head` ends quietly
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        sys.exit(0)
    modes = {"--ledger": ledger, "--ablation": ablation}
    show, args = (modes[args[0]], args[1:]) if args[:1] and args[0] in modes else (main, args)
    if len(args) > 1 or any(a.startswith("-") for a in args):
        sys.exit(f"summary.py: unexpected arguments {' '.join(args)} (--help says how to call it)")
    try:
        show(*args)
    except FileNotFoundError as e:
        sys.exit(f"summary.py: no such file: {e.filename or e}")
    except (ValueError, KeyError) as e:  # not JSON, or not the file the mode reads
        sys.exit(f"summary.py: {e if isinstance(e, ValueError) else f'missing field {e}'}")
