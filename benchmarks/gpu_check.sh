#!/usr/bin/env bash
# Every GPU measurement of avfuse, then the test suite with CUDA visible, on one CUDA GPU
# (written for an H200 host with 16 cores; about 10 minutes). Logs go to $OUT (default
# gpu-check-out/); a summary of each step is printed as it ends.
#
#   bash benchmarks/gpu_check.sh                         # from the repository root
#   STEPS="sweep e2e" bash benchmarks/gpu_check.sh       # some steps only (names below)
#   STEPS=tests TESTS="tests/test_accel.py" bash benchmarks/gpu_check.sh
#
# Step limits add up to 9.5 min; expected ~7-9 min on an H200 (not yet run on one). Where a
# caller has a hard 10-minute limit per command, run STEPS="sweep compiled e2e demo embed" and
# STEPS=tests as two commands.
#
# Steps (each under its own time limit, so one slow or crashing step never hides the rest):
#   1. sweep     bench_train --parts sweep: Cnn14 training, bf16 + channels-last + fused AdamW,
#                batch 64..1024: samples/s, TFLOP/s from counted FLOPs, share of the bf16
#                matrix rate measured in the same run (goal: >= 35 % at the best batch)
#   2. compiled  the same with torch.compile at batch 512
#   3. e2e       `avfuse train` (via train()) from a generated store at batch 256 with 8
#                workers against the model alone (goal: >= 85 %), with data_wait_share
#   4. demo      `avfuse demo` on the GPU: the train stage's time (2 CPU cores: 18.8 s)
#   5. embed     bench_embed --device cuda: Cnn14 on 10 s clips, batch 512 (goal: 500 clips/s)
#   6. tests     every tests/test_*.py in its own pytest process, 4 at a time, CUDA visible
#                (the `cuda`-marked tests run); a crash costs one file, not the suite
#
# Python packages. The host's image has torch, numpy, pandas, pyarrow, scipy, scikit-learn,
# matplotlib, tqdm, pyyaml, tensorboard, pytest(-xdist) and no network. PyAV, soxr, tomli-w
# and the test-only oracles travel as wheels in .whl/ (ignored by git: `echo /.whl/ >>
# .git/info/exclude`), fetched beforehand on a machine with pip and network, for the host's
# CPython 3.12 on x86-64, without dependencies (one version of each):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     av soxr tomli-w librosa audioread soundfile pooch decorator platformdirs standard-aifc \
#     standard-sunau audioop-lts torchlibrosa panns-inference torchvggish \
#     dask distributed partd locket tblib zict tornado \
#     transformers safetensors huggingface-hub tokenizers regex hf-xet typer shellingham
#
# (transformers and its needs serve the AST tests; check `unzip -p .whl/transformers-*.whl
# '*/METADATA' | grep ^Requires-Dist` for the version fetched.)
#
# (pure-Python ones are "py3-none-any" and match any platform; if pip finds no build of a
# compiled one, add --platform manylinux_2_N_x86_64 for its N). This script installs whatever
# .whl/ holds into /tmp/site first. Without .whl/ the steps that need PyAV (demo) fail and
# the test files that need an oracle skip or fail; the benchmarks of steps 1-3 need none.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT/tests"
: >"$OUT/summary.txt"
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "wheel install failed" | tee "$OUT/wheels.log"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

(nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))") \
    >"$OUT/host.txt" 2>&1
cat "$OUT/host.txt"

STEPS=${STEPS:-sweep compiled e2e demo embed tests}
want() { [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    want "$name" || return 0
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

step sweep 90 $PY -m benchmarks.bench_train --device cuda --parts sweep --models cnn14 \
    --steps 20
step compiled 100 $PY -m benchmarks.bench_train --device cuda --parts sweep --models cnn14 \
    --steps 20 --batches 512 --compile
step e2e 100 $PY -m benchmarks.bench_train --device cuda --parts e2e --models cnn14 \
    --e2e-batch 256 --e2e-videos 300 --e2e-epochs 3 --workers 8 --steps 20
step demo 120 $PY -m avfuse demo --work "$SCRATCH/demo-work"
want demo && grep -E "^\s+train\s" "$OUT/demo.log" | tee -a "$OUT/summary.txt"
step embed 60 $PY -m benchmarks.bench_embed --device cuda --clips 8192 --batch 512 \
    --no-reference

# The suite, one process per file, 4 files at a time (16 cores); each file at most 4 min.
want tests || { cat "$OUT/summary.txt"; exit 0; }
t0=$SECONDS
ls ${TESTS:-tests/test_*.py} | xargs -P 4 -I{} sh -c \
    'f={}; n=$(basename $f .py); timeout 240 '"$PY"' -m pytest -q -p no:cacheprovider \
     -o addopts="" "$f" >"'"$OUT"'/tests/$n.log" 2>&1; echo "$n rc $?"' \
    | sort | tee "$OUT/tests.txt"
echo "== tests: $((SECONDS - t0)) s, $(grep -vc ' rc 0$' "$OUT/tests.txt") file(s) not passing" \
    | tee -a "$OUT/summary.txt"
grep -h -E "^(FAILED|ERROR)|Fatal|Segmentation|Aborted" "$OUT"/tests/*.log | head -40
cat "$OUT/summary.txt"
