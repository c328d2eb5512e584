#!/usr/bin/env bash
# GPU check of the CUDA path (then benchmarks/gpu_scale.sh unless SCALE_CHECK=0): the slowrun recipe at a GPU size (~110M parameters: depth 12,
# n_embd 768, bpe:8192, sequence 1024) for a few hundred steps on the builtin data, bf16
# autocast and torch.compile; prints tokens/s and MFU against the H100's ~990 TFLOP/s bf16
# dense peak and writes benchmarks/results/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh            # STEPS=300 PEAK_TFLOPS=990 COMPILE=true MICRO=65536 by default
#
# Needs one CUDA device and slowrun installed (pip install -e .), or its source tree on a
# machine whose Python already has the dependencies (then it runs `python3 -m slowrun` with
# PYTHONPATH=src). A dataset already in data/gpu-check (e.g. prepared elsewhere and copied,
# for a machine without the builtin-corpus packages) is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-300}"
PEAK_TFLOPS="${PEAK_TFLOPS:-990}"
COMPILE="${COMPILE:-true}"
MICRO="${MICRO:-65536}"  # tokens per forward/backward; H200, 101M params: 65,536 -> 36.0% MFU and 33 GB, 131,072 -> 36.7% and 64 GB, 262,144 -> 37.5% and 125 GB (an H100 holds 80 GB)
# EXTRA: more --section.key=value overrides, e.g. EXTRA="--optim.ema_decay=-1"
OUT="${OUT:-benchmarks/results}"
if command -v slowrun >/dev/null; then SLOWRUN=(slowrun); else export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"; SLOWRUN=(python3 -m slowrun); fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
[ -f data/gpu-check/manifest.json ] || \
  "${SLOWRUN[@]}" prepare --source builtin --tokenizer bpe:8192 --train-tokens 4M --out data/gpu-check --no-progress
RUN="runs/gpu-check-$(date +%Y%m%d-%H%M%S)"
"${SLOWRUN[@]}" train --recipe slowrun --data data/gpu-check --run-dir "$RUN" --quiet \
  --model.depth=12 --model.seq_len=1024 --train.batch_tokens=262144 --train.micro_batch_tokens="$MICRO" \
  --train.max_steps="$STEPS" --train.epochs=100 --train.compile="$COMPILE" --train.dtype=bf16 --train.device=cuda \
  --optim.swa_epochs=0 --eval.at_epoch_end=false --eval.max_tokens=262144 --train.log_every=10 ${EXTRA:-}
mkdir -p "$OUT"
python3 - "$RUN" "$PEAK_TFLOPS" "$OUT/gpu_check.json" "$COMPILE" <<'PY'
import json, sys
run, peak, out, compiled = sys.argv[1], float(sys.argv[2]) * 1e12, sys.argv[3], sys.argv[4] == "true"
r = json.load(open(f"{run}/result.json"))
steps = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"kind": "train"' in l]
# steady-state speed: skip the first fifth of the steps (compilation), median step time of the rest
times = sorted(s["step_s"] for s in steps[len(steps) // 5:])
tok_s = r["config"]["train"]["batch_tokens"] / times[len(times) // 2]
mfu = r["flops_per_token"] * tok_s / peak
res = {"device": r["environment"]["device"], "params": r["params"], "flops_per_token": r["flops_per_token"],
       "tokens_per_s": tok_s, "mfu": mfu, "peak_tflops": peak / 1e12, "steps": r["steps"],
       "val_loss": r["val_loss"], "peak_gpu_mb": r["peak_gpu_mb"], "run_dir": run, "compiled": compiled,
       "torch": r["environment"].get("torch")}
json.dump(res, open(out, "w"), indent=2)
print(f"{res['device']}: {r['params'] / 1e6:.0f}M params, {tok_s:,.0f} tok/s, MFU {mfu:.1%} (target >= 40%)")
PY
# then the scale check of the 1-hour track (the `limited` recipe at full size on this GPU)
if [ "${SCALE_CHECK:-1}" = 1 ]; then bash benchmarks/gpu_scale.sh; fi
