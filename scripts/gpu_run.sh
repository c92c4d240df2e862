#!/usr/bin/env bash
# The whole path on a bare GPU host (the image's python3 and torch, nothing else installed, no package index):
# stage=all on the GPU, deploy to the local tritonserver with KIND_GPU instances, a checked query, load tests
# with and without dynamic batching, the server's GPU metrics. Wheels come from scripts/gpu_wheels.sh (run on a
# machine with an index) as .gpu-carry/ (one transfer: everything), or in two folders, one transfer each:
#
#   scripts/gpu_run.sh run-bg OUT     # with .gpu-carry/ present: run (below) in its own process session, so that
#                                     # it outlives one device call; then `wait OUT` in later calls
#   scripts/gpu_run.sh stash          # with .whl-triton/ present: keeps the tritonserver wheel in $GENREC_GPU_HOME
#   scripts/gpu_run.sh run [OUT]      # with .whl/ present: installs, runs everything, writes OUT
#   scripts/gpu_run.sh run-tests-bg OUT  # run, then the gpu-marked tests (tests, below), in the background
#   scripts/gpu_run.sh run-kernels-bg OUT  # run, then kernels (below; after the build, whose caches stay cold)
#   scripts/gpu_run.sh build [OUT]    # the first half of run: installs, stage=all, the validate table
#   scripts/gpu_run.sh serve [OUT]    # the second half: deploy, query, load tests (also with two engine instances
#                                     # and serving.fused=false), GPU metrics
#   scripts/gpu_run.sh build-bg OUT   # build, the same way
#   scripts/gpu_run.sh wait OUT       # until that has finished (WAIT_S, default 540 s; exit 1 if not)
#   scripts/gpu_run.sh all [OUT]      # stash and run, when everything is here at once
#   scripts/gpu_run.sh kernels [OUT]  # our kernels against the reference at 1k..1M items (torch+triton only), and
#                                     # with ML1M_ROOT (a folder holding ml-1m/) the ML-1M preset's stage=all
#   scripts/gpu_run.sh incremental [OUT]  # returning users: GPU hit, host hit, miss against full recompute
#   scripts/gpu_run.sh bench [OUT]    # make bench (BENCH_ARGS: its overrides, e.g. "bench.budget_s=1200"); bench-bg OUT
#   scripts/gpu_run.sh tests [OUT]    # the gpu-marked tests, timed (needs pytest and, from .whl/, hydra)
#
# Environment: GENREC_GPU_HOME (default /tmp/genrec-gpu: installed wheels, the stashed server wheel),
# PYTHON (default python3), GPU_RUN_ARGS (extra overrides for stage=all and serve, e.g. "model=hstu data=ml-1m
# data.root=/tmp/data": keep a carried dataset outside the repo, whose ignored folders a later call may drop),
# LOAD_REQUESTS (default 3000), LOAD_CONCURRENCY (default 32), LOAD_PROCESSES (client processes of those
# loads, default 8: 4 on the H200's host sent about 3,000 requests/s, the server then had room), KERNELS_BUDGET_S
# (default 420), SERVE_TWO, SERVE_THREE (default 1; 0 skips the load with two engine instances, the ensemble of three), INC_ARGS (extra arguments of the incremental bench, e.g. "--profile bench.iters=30").
# OUT gets summary.md plus each step's log, and the server's log.
set -uo pipefail
cd "$(dirname "$0")/.."
home=${GENREC_GPU_HOME:-/tmp/genrec-gpu}
py=${PYTHON:-python3}
phase=${1:-all}
out=${2:-artifacts/gpu-run/$(date -u +%Y-%m-%dT%H-%M-%S)}
mkdir -p "$home"

stash() {
  ls .whl-triton/*.whl >/dev/null 2>&1 || { echo "no .whl-triton/*.whl: run scripts/gpu_wheels.sh first" >&2; exit 1; }
  cp .whl-triton/*.whl "$home"/ && echo "stashed $(ls "$home"/*.whl)"
}

step() {  # step NAME CMD...: runs CMD, its output to OUT/NAME.log and here; records rc and seconds
  local name=$1 start rc; shift
  echo "## $name: $*"
  start=$(date +%s)
  "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  echo "| $name | $rc | $(( $(date +%s) - start )) |" >> "$out/steps.md"
  return "$rc"
}

setup() {  # OUT, its step table, the carried wheels on PYTHONPATH
  mkdir -p "$out"
  [ -f "$out/steps.md" ] || { echo "| step | exit | seconds |" > "$out/steps.md"; echo "| --- | --- | --- |" >> "$out/steps.md"; }
  if [ -f .gpu-carry/site.tar.xz ]; then  # scripts/gpu_wheels.sh's one-transfer form: already installed for us
    local sum; sum=$(cksum < .gpu-carry/site.tar.xz)
    if [ "$(cat "$home/site/.carried" 2>/dev/null)" != "$sum" ]; then
      rm -rf "$home/site" && mkdir -p "$home/site" && tar -xJf .gpu-carry/site.tar.xz -C "$home/site" || exit 1
      echo "$sum" > "$home/site/.carried"
    fi
  elif ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$home/site" .whl/*.whl || exit 1
  fi
  export PYTHONPATH="$home/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
}

triton() {  # tritonserver unpacked under artifacts/triton from the stashed wheel
  if [ ! -x artifacts/triton/pytriton/tritonserver/bin/tritonserver ]; then
    for packed in .gpu-carry/nvidia_pytriton-*.whl.xz; do  # the slimmed wheel of scripts/gpu_wheels.sh
      [ -f "$packed" ] && { xz -dc "$packed" > "$home/$(basename "$packed" .xz)" || exit 1; }
    done
    wheel=$(ls "$home"/nvidia_pytriton-*.whl .whl-triton/nvidia_pytriton-*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || { echo "no nvidia-pytriton wheel: run 'scripts/gpu_run.sh stash' first" >&2; exit 1; }
    step install_triton "$py" -m pipeline.serving install --wheel-file "$wheel" || exit 1
  fi
}

build() {
  setup
  {
    echo "# GPU run $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit $(git describe --always --dirty 2>/dev/null || echo unknown) (-dirty: the tree differs from it)"
    "$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'
  } > "$out/summary.md" 2>&1
  # shellcheck disable=SC2086
  step stage_all "$py" -m pipeline stage=all precision=fp16 device=cuda ${GPU_RUN_ARGS:-}
  local run_dir
  # This run's folder only (newer than the summary written before it), not an earlier run's tables.
  run_dir=$(find artifacts/runs -mindepth 1 -maxdepth 1 -type d -newer "$out/summary.md" -printf '%T@ %p\n' 2>/dev/null \
    | sort -n | tail -1 | cut -d' ' -f2-)
  [ -n "$run_dir" ] && run_dir="$run_dir/"
  for f in validate_variants.md validate_latency.csv compile.json manifest.json; do
    [ -f "$run_dir$f" ] && cp "$run_dir$f" "$out/"
  done
}

serve() {  # GPU_RUN_ARGS as for the build: the data and model the client checks against
  # shellcheck disable=SC2086
  setup
  triton
  local gpu="serving.instance_group.kind=KIND_GPU"
  step deploy "$py" -m pipeline stage=deploy "$gpu" ${GPU_RUN_ARGS:-}
  step query "$py" -m pipeline.client --check "$gpu" ${GPU_RUN_ARGS:-}
  local n=${LOAD_REQUESTS:-3000} c=${LOAD_CONCURRENCY:-32} p=${LOAD_PROCESSES:-8}
  step load_c1 "$py" -m pipeline.serving.loadtest --requests 500 --concurrency 1 "$gpu" ${GPU_RUN_ARGS:-}
  step load_c1_grpc "$py" -m pipeline.serving.loadtest --requests 500 --concurrency 1 --protocol grpc "$gpu" ${GPU_RUN_ARGS:-}
  step load_dynamic "$py" -m pipeline.serving.loadtest --requests "$n" --concurrency "$c" --processes "$p" "$gpu" ${GPU_RUN_ARGS:-}
  step load_returning "$py" -m pipeline.serving.loadtest --returning-users --users 1000 --requests "$n" \
    --concurrency 8 "$gpu" ${GPU_RUN_ARGS:-}
  "$py" - "$out/gpu_metrics.txt" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8002/metrics", timeout=5).read().decode()
open(sys.argv[1], "w").write("\n".join(l for l in text.splitlines() if l.startswith(("nv_gpu", "nv_energy", "nv_inference_count", "nv_inference_exec_count"))) + "\n")
PY
  step deploy_nobatch "$py" -m pipeline stage=deploy "$gpu" ${GPU_RUN_ARGS:-} serving.dynamic_batching.enabled=false
  step load_nobatch "$py" -m pipeline.serving.loadtest --requests "$n" --concurrency "$c" --processes "$p" "$gpu" ${GPU_RUN_ARGS:-} \
    serving.dynamic_batching.enabled=false
  "$py" -m pipeline.serving stop >/dev/null 2>&1  # the same version in another layout: not beside itself
  # Two engine instances on the GPU (each its own python process and CUDA context), batching on.
  if [ "${SERVE_TWO:-1}" = 1 ]; then
    step deploy_two "$py" -m pipeline stage=deploy "$gpu" ${GPU_RUN_ARGS:-} serving.instance_group.count=2
    step load_dynamic_two "$py" -m pipeline.serving.loadtest --requests "$n" --concurrency "$c" --processes "$p" "$gpu" \
      ${GPU_RUN_ARGS:-} serving.instance_group.count=2
    "$py" -m pipeline.serving stop >/dev/null 2>&1
  fi
  if [ "${SERVE_THREE:-1}" = 1 ]; then
    # The ensemble of three python models (serving.fused=false), for comparison with the default's one.
    step deploy_three "$py" -m pipeline stage=deploy "$gpu" ${GPU_RUN_ARGS:-} serving.fused=false
    step load_c1_three "$py" -m pipeline.serving.loadtest --requests 500 --concurrency 1 "$gpu" ${GPU_RUN_ARGS:-} serving.fused=false
    step load_dynamic_three "$py" -m pipeline.serving.loadtest --requests "$n" --concurrency "$c" --processes "$p" "$gpu" \
      ${GPU_RUN_ARGS:-} serving.fused=false
  fi
  grep -h "loaded and warmed" artifacts/serving/server.log > "$out/engine_load.log" 2>/dev/null
  "$py" -m pipeline.serving stop >/dev/null 2>&1
  cp artifacts/serving/server.log "$out/server.log" 2>/dev/null
  {
    echo; echo "## steps"; cat "$out/steps.md"
    echo; echo "## validate (stage=all)"; cat "$out/validate_variants.md" 2>/dev/null
    for s in query load_c1 load_c1_grpc load_dynamic load_returning load_nobatch load_dynamic_two load_c1_three \
      load_dynamic_three; do
      echo; echo "## $s"; grep -v "^\s*$" "$out/$s.log" | tail -12
    done
    echo; echo "## engine load"; cat "$out/engine_load.log" 2>/dev/null
    echo; echo "## GPU metrics"; cat "$out/gpu_metrics.txt" 2>/dev/null
  } >> "$out/summary.md"
  echo "results in $out"
}

background() {  # background PHASE: PHASE in its own process session (it outlives one device call); `wait` for it
  mkdir -p "$out" "$home"
  rm -f "$out/finished"
  setsid nohup bash -c '"$0" "$1" "$2"; echo "exit $?" > "$2/finished"' "$PWD/scripts/gpu_run.sh" "$1" "$out" \
    > "$out/$1.out" 2>&1 < /dev/null &
  echo $! > "$out/pid"
  echo "$1 started in the background: $out (log $out/$1.out)"
}

wait_bg() {  # exit 0: finished; 1: still running after WAIT_S; 2: nothing running or finished in OUT on this host
  local limit=${WAIT_S:-540} start=$SECONDS
  until [ -f "$out/finished" ]; do
    # A host that was replaced between two calls has neither OUT nor the process: say so at once rather
    # than wait out the limit.
    if [ ! -f "$out/pid" ] || ! kill -0 "$(cat "$out/pid")" 2>/dev/null; then
      [ -f "$out/finished" ] && break
      echo "nothing is running in $out on this host and it has not finished (a fresh host, or the run died:" \
        "$(ls "$out"/*.out 2>/dev/null | head -1 || echo 'no log')); start it again" >&2
      return 2
    fi
    if (( SECONDS - start >= limit )); then
      echo "still running after ${limit} s"; cat "$out/steps.md" 2>/dev/null; return 1
    fi
    sleep 5
  done
  cat "$out/steps.md" "$out/finished"
}

kernels() {
  mkdir -p "$out"
  [ -f "$out/steps.md" ] || { echo "| step | exit | seconds |" > "$out/steps.md"; echo "| --- | --- | --- |" >> "$out/steps.md"; }
  export PYTHONPATH="$home/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  step kernels_vs_reference "$py" -m pipeline.bench.kernels_vs_reference --shapes synthetic --specs default+graph \
    --budget-s "${KERNELS_BUDGET_S:-420}" --out "$out/kvr"
  if [ -n "${ML1M_ROOT:-}" ]; then
    step ml1m_stage_all "$py" -m pipeline stage=all precision=fp16 device=cuda model=hstu data=ml-1m \
      data.root="$ML1M_ROOT" train.epochs=3 artifacts_dir="$PWD/artifacts/ml-1m"
    cp "$(ls -td artifacts/ml-1m/runs/*/ | head -1)validate_variants.md" "$out/ml1m_validate_variants.md" 2>/dev/null
  fi
  echo "results in $out"
}

incremental() {
  setup
  # shellcheck disable=SC2086
  step incremental "$py" -m pipeline.bench.incremental --workload incremental-1m --out "$out/incremental" ${INC_ARGS:-}
  echo "results in $out"
}

bench() {  # make bench on this host (the standard GPU workload, every variant of the bench config); BENCH_ARGS
  setup
  # shellcheck disable=SC2086
  step bench "$py" -m pipeline.bench.run --no-mlflow --out "$out/bench" ${BENCH_ARGS:-}
  echo "results in $out"
}

tests() {
  setup
  GENREC_TEST_TIMES="$out/test_times.log" step gpu_tests "$py" -m pytest -m gpu -q -p no:cacheprovider --durations=25 tests
  echo "results in $out"
}

case "$phase" in
  stash) stash ;;
  run) build; serve ;;
  build) build ;;
  serve) serve ;;
  build-bg) background build ;;
  run-bg) background run ;;
  run-tests) build; serve; tests ;;
  run-tests-bg) background run-tests ;;
  run-kernels) build; serve; kernels ;;
  run-kernels-bg) background run-kernels ;;
  wait) wait_bg ;;
  all) stash; build; serve ;;
  kernels) kernels ;;
  incremental) incremental ;;
  bench) bench ;;
  bench-bg) background bench ;;
  tests) tests ;;
  *) echo "usage: scripts/gpu_run.sh stash | run | run-bg | run-tests | run-tests-bg | build | build-bg | run-kernels | run-kernels-bg | wait | serve | all | kernels | incremental | bench | bench-bg | tests [OUT]" >&2
     exit 2 ;;
esac
