#!/usr/bin/env bash
# The one command a lent GPU machine runs (at most 9 minutes end to end): the environment, an
# attention-kernel benchmark, the `limited` recipe at full size compiled with the loop off and
# on, and the projected 8xH100 time of the 1-hour track; each stage under its own timeout,
# each writing its JSON into $OUT as it ends (6 files). See benchmarks/gpu_session.py.
#
# The GPU machine has no network. Prepare here, then carry `.whl` and `data/gpu-session`:
#   bash benchmarks/gpu_wheels.sh                       # tomli-w (and heavyball) as wheels, in .whl/
#   slowrun prepare --tokenizer gpt2 --train-tokens 2M --val-tokens 65536 --test-tokens 0 \
#     --out data/gpu-session --no-progress               # 4.2 MB of GPT-2 tokens
# and on the GPU machine (device tool: carry [".whl", "data/gpu-session"]):
#   bash benchmarks/gpu_session.sh
# Rehearsal on a CPU (toy sizes, float32, no network needed): REHEARSE=1 bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
DATA="${DATA:-data/gpu-session}"
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import tomli_w" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ARGS=(--out "$OUT" --data "$DATA")
if [ "${REHEARSE:-0}" = 1 ]; then
  ARGS+=(--rehearse)
  [ -f "$DATA/manifest.json" ] || python3 -m slowrun prepare --tokenizer gpt2 --train-tokens 65536 --val-tokens 8192 \
    --test-tokens 0 --out "$DATA" --no-progress
fi
[ -f "$DATA/manifest.json" ] || { echo "gpu_session: no dataset at $DATA (prepare it here and carry it: see the header)"; exit 2; }
fail=0
stage() {  # stage SECONDS ARGS...: one stage under its own timeout; a timeout or failure is written, not fatal
  local limit=$1; shift
  timeout --kill-after=10 "$limit" python3 benchmarks/gpu_session.py "$@" "${ARGS[@]}" || {
    rc=$?; fail=1
    if [ $rc -ge 124 ]; then
      name="$1"; [ "$name" = limited ] && name="limited_loop_$([ "${2:-}" = --loop ] && echo on || echo off)"
      echo "{\"error\": \"timed out after ${limit} s\"}" > "$OUT/$name.json"
    fi
  }
}
t0=$(date +%s)
stage 30 env
stage 60 attention
stage 200 limited
stage 200 limited --loop
stage 20 summary
echo "gpu_session: $(( $(date +%s) - t0 )) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $fail
