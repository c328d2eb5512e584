#!/usr/bin/env bash
# The CPU track's nanochat curve on a lent GPU: `slowrun bench cpu-track --parts baseline` for the
# budgets in BUDGETS (default "8 16"), JOBS runs sharing the GPU at once (default 4: the curve's
# models, 3-50M parameters, leave an H100 mostly idle one at a time). The configs are the CPU's own
# (bf16 autocast, same seeds); the ledger's keys leave the device out, so a point finished here is
# done for every machine, and its ledger line records the device.
#
#   bash benchmarks/gpu_curve.sh              # from the repository root, on the GPU machine
#
# With this workplace's device tool: first `bash benchmarks/gpu_wheels.sh` here (the packages its
# image lacks), then one `run`, timeout_s 600, carry [".whl", "benchmarks/work/cpu-track/data",
# "benchmarks/work/cpu-track/nanochat-curve/data"], command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && BUDGETS="16 8" timeout 540 bash benchmarks/gpu_curve.sh
#
# The datasets must travel with the tree: the track's are prepared from the builtin corpus, whose
# packages a machine without a network may lack (with the device tool, carry
# benchmarks/work/cpu-track/data and benchmarks/work/cpu-track/nanochat-curve/data). Their
# manifests name the tokenizer by a path relative to the repository root, so the same relative
# layout reuses them as they are. Finished points are appended to benchmarks/results/ledger.jsonl;
# with $OUT set (the device tool's folder that comes back), a copy of the ledger is left there every
# 20 s and at the end. Back on the development machine:
#
#   python -m slowrun.ledger merge OUT/ledger.jsonl benchmarks/results/ledger.jsonl
#
# Beside the sweep (CROSS=1, the default), one CPU point is trained again here, 1x depth 8 seed 0 (the ledger's
# line 30, 256 steps), and its losses compared with the CPU's: how far this device's
# points differ from the CPU's by numerics alone ($OUT/cross_check.json), which the README must
# state beside the points that ran here.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGETS="${BUDGETS:-8 16}"
JOBS="${JOBS:-4}"
LEDGER=benchmarks/results/ledger.jsonl
if command -v slowrun >/dev/null; then SLOWRUN=(slowrun); else export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"; SLOWRUN=(python3 -m slowrun); fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
# shellcheck source=benchmarks/out_copies.sh
. benchmarks/out_copies.sh
keep_copies "$LEDGER"
CROSS_PID=
if [ "${CROSS:-1}" = 1 ]; then  # beside the sweep (one more small job on the GPU); its failure stops nothing
  rm -rf benchmarks/work/gpu-cross
  mkdir -p "${OUT:-benchmarks/work}"
  python3 -m slowrun.ledger rerun "$LEDGER" @30 --data benchmarks/work/cpu-track/data/1x \
    --run-dir benchmarks/work/gpu-cross --out "${OUT:-benchmarks/work}/cross_check.json" --train.device=cuda &
  CROSS_PID=$!
fi
before=$(wc -l < "$LEDGER")
# shellcheck disable=SC2086
stoppable "${SLOWRUN[@]}" bench cpu-track --parts baseline --budgets $BUDGETS --jobs "$JOBS"
echo "ledger: $before -> $(wc -l < "$LEDGER") lines"
if [ -n "$CROSS_PID" ]; then wait "$CROSS_PID" || echo "the cross-device check failed: see benchmarks/work/gpu-cross/log.txt"; fi
