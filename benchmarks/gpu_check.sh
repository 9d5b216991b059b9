#!/usr/bin/env bash
# One short, prepared run on a CUDA machine: the CUDA correctness tests, the real-model (zoo)
# benchmark, the MLP/CNN benchmark, where the time of a step goes; optionally the opt-in fused
# rule against the eager one and peak CUDA memory (STAGES="fused memory": about 2.5 minutes
# more). The default stages fit one device call of about 8 minutes.
# Usage (repo root, a python3 with CUDA torch; gradlens from the checkout, optional torchjd on
# PYTHONPATH): OUT=/some/dir [STAGES="tests zoo"] bash benchmarks/gpu_check.sh
# Every stage has its own time limit and writes its output under $OUT as it goes.
set -u
OUT=${OUT:-gpu_out}
STAGES=${STAGES:-"tests zoo bench profile"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  $py -c "import importlib.metadata as m; print('torchjd', m.version('torchjd'))" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
  tail -n 25 "$OUT/$name.log"
}

# 1. CUDA correctness: every engine against the float64 loop reference on CUDA, fused path taken
stage tests 150 $py -m pytest tests/test_cuda.py tests/bench/test_bench.py "tests/engines/test_zoo_hf.py::test_zoo_trunk_matches_the_loop_reference_on_cuda" -q --maxfail=5 -p no:cacheprovider \
  -o filterwarnings=default -o addopts="" -m "not slow"
# 2. the real-model benchmark (issue 14): the zoo trunks, every exact engine, auto, the LibMTL loop
stage zoo 150 $py -m gradlens.cli bench --device cuda --zoo --tasks 3,8 --repeats 5 \
  --json "$OUT/bench_zoo.json"
# 3. the MLP/CNN benchmark (eager Linear rule, the default): gramian wall vs kernels on the 11M
# MLP, the CNN's gramian against the LibMTL loop at T = 8 and 40
stage bench 150 $py -m gradlens.cli bench --device cuda \
  --models mlp-1m,mlp-10m,cnn-1m,transformer --tasks 2,8,40 --repeats 7 --json "$OUT/bench.json"
# 4. where the time of a plain and of a probed step goes (kernels vs launches and Python)
stage profile 60 $py benchmarks/profile_step.py --device cuda --model mlp-10m --tasks 8 40
# 5. the opt-in fused (torch.compile) Linear rule, gramian on the 10M MLP
stage fused 75 env GRADLENS_FUSED=1 $py -m gradlens.cli bench --device cuda --models mlp-10m \
  --tasks 8,40 --methods plain,gramian --repeats 7 --json "$OUT/bench_fused.json"
# 6. peak CUDA memory, one fresh process per method
stage memory 75 $py -m gradlens.cli bench --device cuda --models mlp-10m \
  --tasks 40 --repeats 1 --memory --json "$OUT/bench_memory.json"
