#!/usr/bin/env bash
# Scale check of the 1-hour track on ONE GPU: the `limited` recipe at its full size (1.44B
# parameters, sequence 2048) with the per-rank work of an 8-GPU run (8 micro-batches of 8,192
# tokens = 65,536 tokens per step and rank), bf16 and torch.compile. Two short runs: the
# unlooped model (epochs 1-6 of the record) and the looped one (epochs 7-11: blocks 15..20 run
# three times). Prints step time, peak GPU memory and MFU, and projects the 8xH100 wall time
# of the track's 2,097 steps (communication left out) beside the reference's 59.0 minutes;
# writes benchmarks/results/gpu_scale.json.
#
#   bash benchmarks/gpu_scale.sh              # STEPS=12 PEAK_TFLOPS=990 by default
#   DEVICE=cpu PER_RANK=1024 STEPS=3 SCALE="--model.n_layer=4 --model.n_embd=128 --model.n_head=2 \
#     --model.seq_len=64 --model.short_window=16 --model.loop_start=1 --model.loop_end=2 \
#     --train.micro_batch_tokens=512" bash benchmarks/gpu_scale.sh
#                                             # the plumbing on a CPU, tiny (what the test suite does not run)
#
# Needs a dataset in data/gpu-check (bash benchmarks/gpu_check.sh prepares one; the GPT-2
# vocabulary of 50,257 is set here so the output layer has the record's size).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-12}"
PER_RANK="${PER_RANK:-65536}"  # tokens per step and rank: 524,288 / 8
PEAK_TFLOPS="${PEAK_TFLOPS:-990}"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-benchmarks/results}"
if command -v slowrun >/dev/null; then SLOWRUN=(slowrun); else export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"; SLOWRUN=(python3 -m slowrun); fi
[ -f data/gpu-check/manifest.json ] || \
  "${SLOWRUN[@]}" prepare --source builtin --tokenizer bpe:8192 --train-tokens 4M --out data/gpu-check --no-progress
COMPILE=true; DTYPE=bf16
[ "$DEVICE" = cpu ] && COMPILE=false && DTYPE=fp32
STAMP="$(date +%Y%m%d-%H%M%S)"
for LOOP in off on; do
  FROM=99; [ "$LOOP" = on ] && FROM=0
  "${SLOWRUN[@]}" train --recipe limited --data data/gpu-check --run-dir "runs/gpu-scale-$STAMP-loop-$LOOP" --quiet \
    --model.vocab_size=50257 --model.loop_from_epoch=$FROM --train.batch_tokens="$PER_RANK" --train.max_steps="$STEPS" \
    --train.epochs=100 --train.compile=$COMPILE --train.dtype=$DTYPE --train.device="$DEVICE" --train.epoch_snapshots=0 \
    --train.save_final=false --optim.swa_epochs=0 --eval.at_epoch_end=false --eval.reference_batch=-1 \
    --eval.max_tokens=65536 --train.log_every=1 ${SCALE:-}
done
mkdir -p "$OUT"
python3 - "runs/gpu-scale-$STAMP" "$PEAK_TFLOPS" "$OUT/gpu_scale.json" "$PER_RANK" <<'PY'
import json, sys
prefix, peak, out, per_rank = sys.argv[1], float(sys.argv[2]) * 1e12, sys.argv[3], int(sys.argv[4])
rows = {}
for loop in ("off", "on"):
    run = f"{prefix}-loop-{loop}"
    r = json.load(open(f"{run}/result.json"))
    steps = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"kind": "train"' in l]
    times = sorted(s["step_s"] for s in steps[len(steps) // 3:])  # compilation in the first steps
    step_s = times[len(times) // 2]
    flops = r["flops_per_token"]
    rows[loop] = {"step_s": step_s, "tokens_per_s": per_rank / step_s, "flops_per_token": flops,
                  "mfu": flops * per_rank / step_s / peak, "peak_gpu_mb": r["peak_gpu_mb"], "run_dir": run}
# the record: 2,097 steps, looping from epoch 7 (step 1,144 of its 190.6 steps per epoch)
wall = 1144 * rows["off"]["step_s"] + (2097 - 1144) * rows["on"]["step_s"]
res = {"device": r["environment"]["device"], "params": r["params"], "per_rank_tokens_per_step": per_rank, **rows,
       "projected_8gpu_train_min": wall / 60, "reference_train_min": 59.0, "peak_tflops": peak / 1e12}
json.dump(res, open(out, "w"), indent=2)
for loop, row in rows.items():
    print(f"loop {loop}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tok/s per GPU, MFU {row['mfu']:.1%}, "
          f"peak {row['peak_gpu_mb'] / 1024 if row['peak_gpu_mb'] else 0:.1f} GB")
print(f"{res['device']}: {r['params'] / 1e6:,.0f}M params; projected 8-GPU training time of the 1-hour track "
      f"{wall / 60:.1f} min (the reference: 59.0 min), communication not counted")
PY
