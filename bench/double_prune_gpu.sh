#!/usr/bin/env bash
# The double-prune headline on one GPU: a converged VGG-16-BN baseline (recipes/vgg16-fmnist-long.yaml),
# then every seed and arm at once, one process each (one process at batch 64 leaves the GPU mostly idle).
# A smoke run of the same code paths, a few steps each, runs alongside the baseline's training and stops
# everything if it fails, so a broken path costs seconds, not the whole run.
#   bench/double_prune_gpu.sh [OUT]        (make bench-double-prune-gpu)
set -uo pipefail
out=${1:-runs/bench/double-prune-long}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
recipe=${RECIPE:-recipes/double-prune-vgg16-long.yaml}
base=${BASELINE:-runs/cache/vgg16_bn-fmnist-long.safetensors}
smoke=$out/smoke
mkdir -p "$out" "$smoke" runs/cache
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started )) s] $*"; }

smoke_run() {
    $py -m dnnprune train vgg16_bn -r recipes/vgg16-fmnist-long.yaml --max-steps 20 --device "$device" \
        -o "$smoke/base.safetensors" --force &&
    sed -E -e 's/sparsity_steps: [0-9]+/sparsity_steps: 10/' -e 's/finetune_steps: [0-9]+/finetune_steps: 20/' \
        "$recipe" >"$smoke/recipe.yaml" &&
    $py bench/double_prune.py "$smoke/base.safetensors" -r "$smoke/recipe.yaml" --split val --seeds 0 \
        --parallel --device "$device" --out "$smoke/run"
}

trainer=""
if [ ! -f "$base" ]; then
    stamp "training the baseline"
    $py -m dnnprune train vgg16_bn -r recipes/vgg16-fmnist-long.yaml --device "$device" -o "$base" \
        --report "$out/baseline-train.json" --force >"$out/baseline-train.log" 2>&1 &
    trainer=$!
fi
smoke_run >"$out/smoke.log" 2>&1
if [ $? -ne 0 ]; then
    stamp "smoke run failed"
    [ -n "$trainer" ] && kill "$trainer"
    tail -40 "$out/smoke.log"
    for log in "$smoke"/run/*.log; do echo "== $log"; tail -30 "$log"; done
    exit 1
fi
stamp "smoke run passed"
if [ -n "$trainer" ] && ! wait "$trainer"; then
    stamp "baseline training failed"
    tail -40 "$out/baseline-train.log"
    exit 1
fi
stamp "baseline ready"
$py bench/double_prune.py "$base" -r "$recipe" --seeds 0,1,2 \
    --arms dnnprune,control,tp --parallel --device "$device" --out "$out"
status=$?
stamp "headline finished with status $status"
exit $status
