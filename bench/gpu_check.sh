#!/usr/bin/env bash
# The one script to run on a lent GPU machine: environment, extension build, GPU tests, benchmarks.
#
#   OUT=/some/dir bash bench/gpu_check.sh        # from anywhere; it cds to the repo root
#
# Stages (each logs to $OUT/<stage>.log; a failing stage does not stop the others):
#   env             nvidia-smi, python, torch/triton versions, whether CUDA is usable
#   setup           only if `import torch` fails: pip install torch==2.14.1 triton diffusers ...;
#                   wheels carried in ./.whl (see the device README) are installed in any case
#   build           CAT_KERNELS_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .
#   pytest-gpu      pytest -m gpu                        (junit: $OUT/junit-gpu.xml)
#   pytest-kernels  pytest tests/kernels tests/test_bench.py on CUDA (junit: $OUT/junit-kernels.xml)
#   bench           python bench/run.py --suite all --device cuda --json $OUT/bench-cuda.json
# Without a GPU (no nvidia-smi, or torch sees no CUDA device) the CUDA stages are skipped and a
# CPU smoke run of the benchmark (gather cases) takes their place, so the script can be tried
# anywhere. Every stage runs under `timeout`; the whole script stays under GPU_CHECK_BUDGET_S
# (default 480 s): a stage gets at most what is left minus what the later stages are promised.
#
# Knobs: PYTHON (default: ./.venv/bin/python if it imports torch, else python3), GPU_CHECK_BUDGET_S, GPU_CHECK_BUILD=0
# to skip the build, GPU_CHECK_PACK=0 to keep every log loose. The device tool returns at most
# 8 files, so by default the per-stage logs are also packed into $OUT/gpu-check-logs.tgz and
# only summary.txt, the junit XML, bench-cuda.json, bench.log and the archive stay loose.
#
# Exit status: 0 when no stage failed (skipped stages are not failures), else 1.

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
OUT=${OUT:-$REPO/out/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=()

if [ -z "${PYTHON:-}" ]; then
  # A venv of this checkout when there is one that works (here), else the system python3 (the
  # lent GPU machine's python3 holds PyTorch and Triton).
  if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    PYTHON=$REPO/.venv/bin/python
  else
    PYTHON=python3
  fi
fi
export PYTHON REPO PYTHONUNBUFFERED=1 CAT_BENCH_NO_PROGRESS=1
# The package from this checkout whether or not the editable install below works.
export PYTHONPATH=$REPO:$REPO/python${PYTHONPATH:+:$PYTHONPATH}

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S RESERVE_S CMD...: run CMD with its output in $OUT/NAME.log, for at most
# LIMIT_S seconds and never into the last RESERVE_S seconds of the budget (kept for later stages).
stage() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START) - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    log "$name: SKIPPED (no time left in the ${BUDGET}s budget)"
    echo "skipped: no time left" >"$OUT/$name.log"
    FAILED+=("$name(no-time)")
    return 1
  fi
  # timeout runs programs, not shell functions: run an (exported) function in a child bash.
  [ "$(type -t "$1")" = function ] && set -- bash -c "$1"
  log "$name: start (limit ${limit}s)"
  local t0=$(date +%s) rc
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    log "$name: ok (${dt}s)"
  else
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && log "$name: TIMEOUT after ${dt}s" || log "$name: FAILED rc=$rc (${dt}s)"
    FAILED+=("$name")
    tail -n 15 "$OUT/$name.log" | sed "s/^/    $name| /" | tee -a "$SUMMARY"
  fi
  return $rc
}

skip() { log "$1: SKIPPED ($2)"; echo "skipped: $2" >"$OUT/$1.log"; }

# ---------------------------------------------------------------- env
env_report() {
  echo "## date: $(date -u +%FT%TZ)  host: $(hostname)  repo: $REPO"
  echo "## git: $(git rev-parse --short=12 HEAD 2>/dev/null || echo 'no .git (copied tree)')"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  echo "## python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
  "$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "triton", "diffusers", "transformers", "pytest", "tqdm", "numpy"):
    try:
        print(f"{name:13s} {importlib.import_module(name).__version__}")
    except Exception as exc:
        print(f"{name:13s} MISSING ({type(exc).__name__})")
try:
    import torch
    print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}")
except Exception as exc:
    print("torch probe failed:", exc)
EOF
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
  return 0
}
export -f env_report
stage env 30 450 env_report

# ---------------------------------------------------------------- setup
setup() {
  local rc=0
  if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "import torch failed: installing (needs a package index)"
    "$PYTHON" -m pip install torch==2.14.1 triton diffusers transformers safetensors pytest tqdm || rc=1
  else
    echo "torch present: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  fi
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    echo "installing carried wheels from .whl into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$REPO"/.whl/*.whl || rc=1
  fi
  return $rc
}
export -f setup
stage setup 120 420 setup
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    HAS_GPU=1
  else
    log "cuda-probe: FAILED (nvidia-smi is there but torch sees no CUDA device)"
    FAILED+=("cuda-probe")
  fi
fi
log "GPU: $([ $HAS_GPU = 1 ] && echo yes || echo 'no: CUDA stages are skipped')"

# ---------------------------------------------------------------- build
if [ "${GPU_CHECK_BUILD:-$HAS_GPU}" = 1 ]; then
  # Hopper only (the lent machines are H100/H200): one arch compiles in a fraction of the time.
  export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  stage build 150 300 env CAT_KERNELS_BUILD_EXT=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . || true
  "$PYTHON" -c "import cat_kernels.extension" >>"$OUT/build.log" 2>&1 \
    && log "extension: imports" || log "extension: does not import (ext provider skipped)"
else
  skip build "no GPU; GPU_CHECK_BUILD=1 forces it"
fi

# ---------------------------------------------------------------- tests
if [ $HAS_GPU = 1 ]; then
  export TRITON_INTERPRET=0
  # rc 5 = no tests collected (no gpu-marked tests yet) is not a failure.
  stage pytest-gpu 90 260 bash -c '"$0" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$1" tests; rc=$?; [ $rc -eq 5 ] && exit 0; exit $rc' \
    "$PYTHON" "$OUT/junit-gpu.xml" || true
  stage pytest-kernels 120 180 "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit-kernels.xml" \
    tests/kernels tests/test_bench.py || true
else
  skip pytest-gpu "no GPU"
  skip pytest-kernels "no GPU"
fi

# ---------------------------------------------------------------- bench
if [ $HAS_GPU = 1 ]; then
  stage bench 240 10 "$PYTHON" bench/run.py --suite all --device cuda --json "$OUT/bench-cuda.json" || true
else
  skip bench "no GPU"
  stage bench-cpu-smoke 90 10 "$PYTHON" bench/run.py --suite kernels --device cpu --quick --filter gather \
    --json "$OUT/bench-cpu-smoke.json" || true
fi

# ---------------------------------------------------------------- wrap up
if [ ${#FAILED[@]} -eq 0 ]; then log "all stages passed or were skipped"; else log "FAILED: ${FAILED[*]}"; fi
if [ "${GPU_CHECK_PACK:-1}" = 1 ]; then
  (cd "$OUT" && tar czf gpu-check-logs.tgz --exclude gpu-check-logs.tgz ./*.log ./*.json ./*.xml summary.txt 2>/dev/null)
  for f in "$OUT"/*.log; do
    case $(basename "$f") in bench.log | bench-cpu-smoke.log) ;; *) rm -f "$f" ;; esac
  done
fi
[ ${#FAILED[@]} -eq 0 ]
