#!/usr/bin/env bash
# The neuron's GPU check, in one run on a CUDA host (no network needed). From the repository root:
#
#     bash benchmarks/gpu/run.sh                  # cuda:0
#     bash benchmarks/gpu/run.sh --device cpu     # the dry run: same stages, tiny sizes, CPU
#
# Stages (each under `timeout`, each continuing to the next on failure, all within GPU_CHECK_BUDGET_S),
# the measurements that matter most first, so a short budget still gets them:
#   engine      a tiny model loaded through Engine on the device: measured memory, 8 concurrent greedy
#               requests, unload and the CUDA allocator back to its baseline; a bad ordinal fails fast
#   bench       benchmarks/gpu/bench.py with CUDA graphs, then with the layers compiled before capture
#               ([engine] cuda_compile): qwen3-8b, then qwen3-0.6b
#   versions    python/torch/transformers/CUDA/GPU, nvidia-smi
#   discovery   NVML discovery matched to torch's CUDA devices by UUID; again under CUDA_VISIBLE_DEVICES=<uuid>
#   serve       a real `neuron serve` on the device with the tiny model, one HTTP chat request
#   bench       the same two shapes eager (greedy answers compared with the graph runs in the summary)
#   host_step   benchmarks/host_step.py: the host side of a decode step on this host's CPU (1-layer model)
#   engine.py   benchmarks/engine.py (the CPU benchmark's GPU mode, with generate() alongside), if time is left
#   summary     summary.json: the figures that matter, side by side
#
# Output in $OUT (default /tmp/cortex-gpu-out): run.log, results.jsonl (one JSON line per stage),
# summary.json, neuron.log, nvidia-smi.txt, engine-bench.json.
# Missing Python packages (pydantic, orjson, llguidance) are installed from .whl/ when it is there;
# .whl/tokenizer holds the SmolLM2 tokenizer the random-weight models use.
set -u
cd "$(dirname "$0")/../.." || exit 1

DEVICE=cuda:0
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=$2; shift 2 ;;
        *) echo "usage: bash benchmarks/gpu/run.sh [--device cuda:0|cpu]"; exit 2 ;;
    esac
done
OUT=${OUT:-/tmp/cortex-gpu-out}
mkdir -p "$OUT"
export OUT
# The GPU run has ~540 s; the CPU dry run is slower (random init of a 152k-vocabulary model on a shared
# CPU), so its budget and every stage's limit are doubled.
SCALE=1
[ "$DEVICE" = cpu ] && SCALE=2
BUDGET_S=${GPU_CHECK_BUDGET_S:-$((540 * SCALE))}
START=$(date +%s)
PY=${PYTHON:-python3}
HERE=benchmarks/gpu
exec > >(tee -a "$OUT/run.log") 2>&1

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=${HF_HOME:-/tmp/cortex-hf} PYTHONUNBUFFERED=1
export GPU_CHECK_WORK=${GPU_CHECK_WORK:-/tmp/cortex-gpu-check}
if ! $PY -c "import pydantic, orjson, llguidance" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    echo "### installing carried wheels into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD:${PYTHONPATH:-}
else
    export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-}
fi

# stage NAME LIMIT_S command...: runs it under timeout, clipped to what is left of the budget.
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local now left rc
    now=$(date +%s)
    left=$((BUDGET_S - (now - START) - 15))
    if [ "$left" -lt 20 ]; then
        echo "### $name: skipped, ${left}s of the budget left"
        echo "{\"stage\": \"$name\", \"skipped\": true}" >>"$OUT/results.jsonl"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "### $name (limit ${limit}s) at $(date -u +%H:%M:%S)"
    timeout -k 5 "$limit" "$@"
    rc=$?
    echo "### $name: rc=$rc after $(($(date +%s) - now))s"
    if [ "$rc" -ne 0 ]; then
        echo "{\"stage\": \"$name\", \"rc\": $rc, \"timed_out\": $([ "$rc" -eq 124 ] && echo true || echo false)}" \
            >>"$OUT/results.jsonl"
    fi
}

echo "### cortex GPU check on $DEVICE, $(date -u), budget ${BUDGET_S}s"
if [ "$DEVICE" = cpu ]; then
    SMALL=(--layers 2 --new-tokens 8 --streams 2 --arrival-s 0.1)
    SHAPES=(qwen3-0.6b)
else
    SMALL=()
    SHAPES=(qwen3-8b qwen3-0.6b)
fi
EAGER=("${SMALL[@]}")
[ "$DEVICE" = cpu ] || EAGER=(--new-tokens 128)  # eager decode is several times slower: keep it in its time box

stage engine 90 $PY $HERE/check.py engine --device "$DEVICE"
for shape in "${SHAPES[@]}"; do
    stage "bench $shape graphs" 150 $PY $HERE/bench.py --device "$DEVICE" --shape "$shape" "${SMALL[@]}"
    stage "bench $shape graphs+compile" 180 $PY $HERE/bench.py --device "$DEVICE" --shape "$shape" --compile "${SMALL[@]}"
done
stage versions 40 bash -c "nvidia-smi >'$OUT/nvidia-smi.txt' 2>&1; nvidia-smi -L; $PY $HERE/check.py versions"
stage discovery 40 $PY $HERE/check.py discovery
UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | head -1)
if [ -n "$UUID" ]; then
    stage discovery-visible-uuid 40 env CUDA_VISIBLE_DEVICES="$UUID" $PY $HERE/check.py discovery
fi
stage serve 120 $PY $HERE/check.py serve --device "$DEVICE" --log "$OUT/neuron.log"
for shape in "${SHAPES[@]}"; do
    stage "bench $shape eager" 120 $PY $HERE/bench.py --device "$DEVICE" --shape "$shape" --eager "${EAGER[@]}"
done
stage host_step 60 $PY benchmarks/host_step.py --new-tokens 32
if [ "$DEVICE" != cpu ]; then
    stage engine.py 200 bash -c "CORTEX_TOKENIZER_DIR=.whl/tokenizer $PY benchmarks/engine.py --device $DEVICE \
        --shape qwen3-0.6b --dtype bfloat16 --repeats 1 --new-tokens 64 --streams 8 --no-peers \
        >'$OUT/engine-bench.json'"
fi
echo "### summary"
timeout -k 5 20 $PY $HERE/summary.py
echo "### done in $(($(date +%s) - START))s; files in $OUT:"
ls -la "$OUT"
