#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks, for bench/gpu_check.sh: its python3 (3.12) has torch,
# triton, transformers, safetensors, huggingface-hub, httpx, pillow, tqdm and pytest, but not
# diffusers nor importlib-metadata (diffusers needs it). Both are pure Python.
#
#   tools/fetch_gpu_wheels.sh       # then run(command="bash bench/gpu_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl "diffusers==0.42.1" importlib-metadata
ls -la .whl
