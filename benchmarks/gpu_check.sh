#!/usr/bin/env bash
# One short, prepared run on a CUDA machine: the CUDA correctness tests, then the benchmark.
# Usage (repo root, a python3 with CUDA torch; gradlens from the checkout, optional torchjd on
# PYTHONPATH): OUT=/some/dir bash benchmarks/gpu_check.sh
# Every stage has its own time limit and writes its output under $OUT as it goes.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  $py -c "import torchjd; print('torchjd', torchjd.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
  tail -n 25 "$OUT/$name.log"
}

# 1. CUDA correctness: every engine against the float64 loop reference on CUDA, fused path taken
stage tests 150 $py -m pytest tests/test_cuda.py tests/test_bench.py -q --maxfail=5 -p no:cacheprovider \
  -o filterwarnings=default -o addopts="" -m "not slow"
# 2. the benchmark with the eager Linear rule (no compilation in the timings' warm-up)
stage bench 150 env GRADLENS_FUSED=0 $py -m gradlens.cli bench --device cuda \
  --models mlp-1m,mlp-10m,cnn-1m,transformer --tasks 2,8,40 --repeats 7 --json "$OUT/bench.json"
# 3. fused (torch.compile) Linear rule against the eager one, gramian on the 10M MLP
stage fused 75 $py -m gradlens.cli bench --device cuda --models mlp-10m --tasks 8,40 \
  --methods plain,gramian --repeats 7 --json "$OUT/bench_fused.json"
# 4. peak CUDA memory, one fresh process per method
stage memory 75 env GRADLENS_FUSED=0 $py -m gradlens.cli bench --device cuda --models mlp-10m \
  --tasks 40 --repeats 1 --memory --json "$OUT/bench_memory.json"
