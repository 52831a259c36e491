#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the CUDA tests, then benchmarks/gpu_iteration.py (our bf16 iteration,
# its variants, a batch sweep, the profile, the memory extrapolation, and the official code's fp32 iteration in
# the same call; our fp32 iteration with cuDNN's autotuner and without; --compile last). Every step has its own
# time limit and writes its log into OUT (default ./gpu-out). About 8-13 minutes; run fewer steps in a short lease.
#
#     bash benchmarks/gpu_check.sh /path/to/diff_instruct [OUT]
#
# The official code is a local clone of pkulwj1994/diff_instruct (never vendored).
set -u
official=${1:?"usage: bash benchmarks/gpu_check.sh /path/to/diff_instruct [OUT]"}
out=${2:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
py=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, print the log's end
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    tail -n 25 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
$py -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.backends.cudnn.version())'
step tests 120 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_optim.py \
    tests/test_official_recipe.py tests/test_attention.py
step iteration 220 $py benchmarks/gpu_iteration.py --batch 128 --iters 5 --warmup 2 \
    --variants channels-last,reuse-pass --sweep 256,512 --profile "$out/profile.txt" --official "$official"
# cuDNN keeps the algorithms it chose for a shape for the rest of a process: its autotuner is compared across processes
step fp32-autotuned 90 $py benchmarks/gpu_iteration.py --precision fp32 --iters 3 --memory-batches 1,2
step fp32-heuristic 90 $py benchmarks/gpu_iteration.py --precision fp32 --iters 3 --memory-batches 1,2 \
    --no-cudnn-benchmark
# compiling the three networks took over 120 s on an H200's 16 cores
step compile 300 $py benchmarks/gpu_iteration.py --batch 128 --iters 5 --warmup 2 --variants compile \
    --memory-batches 1,2
