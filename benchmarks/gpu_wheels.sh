#!/usr/bin/env bash
# The Python packages slowrun needs that a lent GPU machine's image lacks, as wheels in .whl/
# (ignored by git), downloaded here (the GPU machine reaches no package index): tomli-w (config
# files) and heavyball (the second-order swaps of benchmarks/ablation_cpu.sh). The image already
# holds torch, numpy, tiktoken, tokenizers, safetensors, tqdm, matplotlib, scipy and opt-einsum.
# The builtin corpus' packages are not needed there: the datasets travel prepared.
#
#   bash benchmarks/gpu_wheels.sh      # here; then, first thing in the GPU command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-3.12}"  # the GPU image's python
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  tomli-w==1.2.0 heavyball==3.2.1
ls -l .whl
