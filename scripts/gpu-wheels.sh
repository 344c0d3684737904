#!/usr/bin/env bash
# Fetch, here (where a package registry answers), the wheels the GPU machine's image lacks, into
# .whl/ (git-ignored): scripts/gpu-check.sh installs them there with --no-index. The image has
# Python 3.12, PyTorch, Triton, transformers, numpy, scipy, pandas, pyarrow, safetensors,
# jaxtyping, tqdm, pytest and hypothesis (see /work/.library/device/KINDS.md); it lacks these.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
WHEELS=(
  transformer-lens==4.3.0 beartype==0.23.1 fancy-einsum==0.0.3 typeguard==4.6.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 duckdb==2.0.1
)
PYTHON=${PYTHON:-python3}
for wheel in "${WHEELS[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$wheel"
done
du -sh .whl
