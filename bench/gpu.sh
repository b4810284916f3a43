#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, as one short script for a lent GPU machine (issue 18).
#
#   bash bench/gpu.sh prepare   here, on the development machine: puts Python 3.12 wheels of the
#                               packages the GPU image lacks under .whl/ (git-ignored; ~10 MB)
#   bash bench/gpu.sh run       there, in the repository root (with .whl carried): installs them
#                               into /tmp/site and runs the benches, logging to $OUT/gpu.log
#
# The GPU image has torch, timm, pyarrow, fsspec, safetensors, opencv and scikit-image, but not
# Ray, pydantic, albumentations, smp or pytorch-grad-cam. Ray's wheel (~79 MB) is larger than
# what one call may carry (64 MiB), so the figures that need Ray (the label job through Ray
# Data, training through Ray Train with the loop's own data_wait_seconds) cannot be taken there;
# bench/gpu.py measures their in-process equivalents: training steps of both stages, decoding
# against the step, and one labeling actor's work. Budget: about 5 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
  local py=.venv/bin/python
  rm -rf .whl && mkdir -p .whl
  pin() { "$py" -m pip show "$1" | sed -n 's/^Version: //p'; }
  local pkgs=()
  for p in pydantic pydantic-core annotated-types typing-inspection albumentations albucore simsimd stringzilla \
           segmentation-models-pytorch ttach; do
    pkgs+=("$p==$(pin "$p")")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
  # pytorch-grad-cam ships only an sdist; it is pure Python, so a wheel built here installs there
  "$py" -m pip wheel -q --no-deps -w .whl "grad-cam==$(pin grad-cam)"
  du -sh .whl
}

run() {
  : "${OUT:=/tmp/gpu-out}"
  mkdir -p "$OUT"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 bench/gpu.py --size 256x1600 --encoder efficientnet_b0 --batch 16 --images 64
    python3 bench/cam_throughput.py --size 256x1600 --batch 8 --encoder efficientnet_b0 --device cuda --repeat 3
  } 2>&1 | tee "$OUT/gpu.log"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash bench/gpu.sh prepare|run" >&2; exit 2 ;;
esac
