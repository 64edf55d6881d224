#!/usr/bin/env bash
# The runs of one device session (the `device` tool's GPU machine, vLLM 0.26.0 put there with
# ../shared/device/README.md), so that each call's command line stays short and the exact
# commands behind benchmarks/results/ are in the repository.
#
#   source .device/part2/install.sh   (first call after part1; later calls: source .device/part2/env.sh)
#   bash scripts/gpu_session.sh setup            # this package + its vLLM entry point
#   bash scripts/gpu_session.sh kernels          # kernel tests natively + bench_cache_ops column_mass
#   bash scripts/gpu_session.sh graphs           # cuda_graphs: replayed decode graphs vs the piecewise path
#   bash scripts/gpu_session.sh throughput ARGS  # benchmarks/throughput.py, JSON kept in /tmp/thr
#   bash scripts/gpu_session.sh serving ARGS     # benchmarks/serving.py in this call, JSON kept in /tmp/srv
#   bash scripts/gpu_session.sh serving-start ARGS   # the same in the background (give it --time-limit)
#   bash scripts/gpu_session.sh serving-wait     # waits for it (at most ~560 s), then collects
#   bash scripts/gpu_session.sh soak-start SECONDS CLIENTS [SERVER_FLAGS]   # OpenAI-server soak in the background
#        (e.g. SERVER_FLAGS="--kv-compression-config '{\"cuda_graphs\": true}'": load.py shlex-splits it)
#   bash scripts/gpu_session.sh soak-wait        # waits for it (at most ~580 s), then collects
#   bash scripts/gpu_session.sh profile [REQUESTS] [PROMPT]   # one decode step's time, plain and snapkv@0.1 at
#        the same batch (same-batch plain), engine in process: step times, then cProfile and torch profiles, to $OUT
#   bash scripts/gpu_session.sh prefill-profile [REQUESTS] [PROMPT] [CONFIGS]   # torch.profiler over the prefill
#        of plain and each config (default plain,snapkv@0.1,ems@0.1 at 48 x 6000) and its waits for the GPU by line, to $OUT
#
# Results go to $OUT (the device tool fetches at most 8 files): throughput-h200.{json,png},
# serving-<gpu>.{json,png}, reliability-gpu.json, logs.tar.xz.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
THR=/tmp/thr/throughput-h200.json
SOAK=/tmp/soak
# the serving JSON of this GPU (serving.py refuses a file of another device): h100 or h200
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i 'h[0-9]\{3\}' | tr 'H' 'h' || true)
SRV=/tmp/srv/serving-${GPU:-gpu}.json
step=${1:?step}; shift || true

collect_logs() {
  # engine logs of throughput.py, serving.py's server/client logs and event files (not its compile
  # cache), the soak's load log and its server's log (in load.py's workdir)
  (cd /tmp && tar cJf "$OUT/logs.tar.xz" --ignore-failed-read --exclude=vllm-cache \
    $(ls -d logs srv/logs srv/serving.log soak/load.log kvc-load-*/server.log 2>/dev/null)) || true
}

prepare_serving() {
  # the JSON merges with the results already in the repository (done runs are skipped)
  mkdir -p /tmp/srv/logs
  [ -f "$SRV" ] || cp "benchmarks/results/$(basename "$SRV")" "$SRV" 2>/dev/null || true
}
SERVING=(python3 benchmarks/serving.py --out "$SRV" --log-dir /tmp/srv/logs --model-dir /tmp/srv/models)

collect_serving() {
  cp "$SRV" "${SRV%.json}.png" "$OUT/" 2>/dev/null || echo "no serving JSON (yet)"
  collect_logs
}

case "$step" in
  setup)
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
    python3 -c "from importlib import metadata; eps=[e.value for e in metadata.entry_points(group='vllm.general_plugins')]; print('entry points', eps); assert any(v.startswith('vllm_kvcompress.') for v in eps)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    ;;
  kernels)
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/triton_kernels tests/vllm/test_kernels.py 2>&1 | tail -15
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/vllm/test_compressor.py -k wait_for_the_gpu 2>&1 | tail -5
    timeout 120 python3 benchmarks/bench_cache_ops.py column_mass recompression 2>&1 | tail -20
    ;;
  graphs)
    timeout 400 python3 scripts/graph_check.py 2>&1 | tee /tmp/graph_check.log | grep -v "^\(INFO\|WARNING\|DEBUG\)" | tail -20
    grep -o "Capturing CUDA graphs[^\n]*" /tmp/graph_check.log | sort | uniq -c | head -5
    cp /tmp/graph_check.log "$OUT/"
    grep -q "^OK" /tmp/graph_check.log  # the step fails unless the check passed
    ;;
  throughput)
    mkdir -p /tmp/thr /tmp/logs
    [ -f "$THR" ] || cp benchmarks/results/throughput-h200.json "$THR"
    python3 benchmarks/throughput.py --out "$THR" --log-dir /tmp/logs "$@" || echo "throughput.py exited $?"
    cp "$THR" "${THR%.json}.png" "$OUT/" 2>/dev/null || true
    collect_logs
    ;;
  serving)
    prepare_serving
    "${SERVING[@]}" "$@" 2>&1 | tee /tmp/srv/serving.log | tail -60 || echo "serving.py exited $?"
    collect_serving
    ;;
  serving-start)
    # like soak-start: survives the call that starts it; serving-wait in later calls
    prepare_serving
    setsid nohup "${SERVING[@]}" "$@" > /tmp/srv/serving.log 2>&1 < /dev/null &
    echo "serving.py started in the background: ${SERVING[*]} $*"
    ;;
  serving-wait)
    limit=${1:-560}; start=$(date +%s)
    while pgrep -f "benchmarks/serving.py" > /dev/null && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 5; done
    pgrep -f "benchmarks/serving.py" > /dev/null && echo "serving.py still running after $limit s"
    grep "^\[serving\]" /tmp/srv/serving.log | tail -40
    tail -c 6000 /tmp/srv/serving.log | grep -v "^\[serving\]" | tail -40
    collect_serving
    ;;
  soak-start)
    seconds=${1:-600}; clients=${2:-256}; server_flags=${3:-}
    mkdir -p "$SOAK"
    python3 - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import build_model_dir
build_model_dir("llama3-8b", Path("/tmp/soak/models"))
Path("/tmp/soak/chat.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
PY
    # Dummy Llama-3-8B; the WordLevel tokenizer maps each of load.py's words to one token, so its
    # prompt lengths (and the context-filling and too-long inputs) are exact. A pool of ~0.3 of
    # the GPU, so that 256 clients press on it.
    flags="--load-format dummy --tokenizer $SOAK/models/llama3-8b/tokenizer --max-model-len 4096 --max-num-seqs 256 --gpu-memory-utilization 0.3 --seed 0"
    setsid nohup python3 benchmarks/load.py --model "$SOAK/models/llama3-8b" --chat-template "$SOAK/chat.jinja" \
      --kv-compression snapkv --kv-budget 0.1 --engine-flags "$flags" --server-flags "$server_flags" \
      --clients "$clients" --seconds "$seconds" --prompt-max 3000 --max-tokens 256 --faults \
      --out "$SOAK/reliability-gpu.json" > "$SOAK/load.log" 2>&1 < /dev/null &
    echo "soak started: $clients clients, $seconds s, server flags: ${server_flags:-none}"
    ;;
  soak-wait)
    limit=${1:-580}; start=$(date +%s)
    while pgrep -f "benchmarks/load.py" > /dev/null && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 5; done
    pgrep -f "benchmarks/load.py" > /dev/null && echo "soak still running after $limit s"
    cp "$SOAK/reliability-gpu.json" "$OUT/" 2>/dev/null || echo "no reliability-gpu.json (yet)"
    cp "$SOAK/load.log" "$OUT/" 2>/dev/null || true
    tail -c 3000 "$SOAK/load.log" || true
    collect_logs
    ;;
  profile)
    # where a decode step's time goes, the plugin against plain vLLM holding the same requests
    requests=${1:-64}; prompt=${2:-6000}
    for config in plain snapkv@0.1; do
      timeout 280 python3 benchmarks/profile_engine.py --config "$config" --requests "$requests" --prompt "$prompt" \
        --steps 48 --profile-steps 12 --cprofile --torch-profile --step-times --gpu-memory-utilization 0.85 \
        --out "$OUT/profile-${config//@/-}.txt" 2>&1 \
        | grep "^{" || echo "profile of $config failed"
    done
    ;;
  prefill-profile)
    # where a prefill step's time goes: plain vLLM and the plugin over the same prompts (same steps
    # when plain's pool holds them all), torch.profiler over the prefill, to $OUT
    requests=${1:-48}; prompt=${2:-6000}; configs=${3:-plain,snapkv@0.1,ems@0.1}
    for config in ${configs//,/ }; do
      timeout 280 python3 benchmarks/profile_engine.py --config "$config" --requests "$requests" --prompt "$prompt" \
        --steps 8 --profile-steps 0 --profile-prefill --sync-debug --gpu-memory-utilization 0.85 \
        --out "$OUT/prefill-${config//@/-}-${requests}x${prompt}.txt" 2>&1 | grep "^{" || echo "prefill profile of $config failed"
    done
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
