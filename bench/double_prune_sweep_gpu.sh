#!/usr/bin/env bash
# The double-prune sweep on one GPU: the five baselines trained to 12 epochs at once, then one sweep
# process per model at once (bench/double-prune-sweep-long.yaml), merged into one table and plot.
# Also, on val: MobileNetV2 with the default 5 % width floor against a 25 % floor (min_fraction), since
# the global |gamma| threshold cut its last 1x1 conv to the floor in the CPU sweep.
#   bench/double_prune_sweep_gpu.sh [OUT]
set -uo pipefail
out=${1:-runs/bench/double-prune-sweep-long}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
plan=${PLAN:-bench/double-prune-sweep-long.yaml}
epochs=${EPOCHS:-12}
mkdir -p "$out/plans" runs/cache
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started )) s] $*"; }

declare -A arch=([vgg16_bn]=vgg16_bn [resnet20]=resnet20 [resnet56]=resnet56 [mobilenetv2_cifar]=mobilenetv2_cifar
                 [mobilenet_v3_small]=torchvision.mobilenet_v3_small)
declare -A train_recipe=([vgg16_bn]=recipes/vgg16-fmnist.yaml [resnet20]=recipes/resnet20-fmnist.yaml
                         [resnet56]=recipes/resnet56-fmnist.yaml [mobilenetv2_cifar]=recipes/mobilenetv2-fmnist.yaml
                         [mobilenet_v3_small]=recipes/mobilenetv3s-fmnist.yaml)
# one plan per model (and the two val plans), each with the shared phases and points
$py - "$plan" "$out/plans" <<'PY'
import sys, yaml
from pathlib import Path
plan, folder = yaml.safe_load(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
for model in plan["models"]:
    (folder / f"{model['name']}.yaml").write_text(yaml.safe_dump({**plan, "models": [model]}))
    print(model["name"], model["checkpoint"])
mnv2 = next(m for m in plan["models"] if m["name"] == "mobilenetv2_cifar")
for name, extra in (("mnv2-val-floor05", {}), ("mnv2-val-floor25", {"min_fraction": 0.25})):
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({**plan, "phases": {**plan["phases"], **extra},
                                                        "models": [{**mnv2, "name": name}]}))
PY
pids=()
while read -r name checkpoint; do
    [ -f "$checkpoint" ] && continue
    $py -m dnnprune train "${arch[$name]}" -r "${train_recipe[$name]}" --epochs "$epochs" --device "$device" \
        -o "$checkpoint" --report "$out/$name-train.json" --force >"$out/$name-train.log" 2>&1 &
    pids+=($!)
done < <($py -c "import sys,yaml; [print(m['name'], m['checkpoint']) for m in yaml.safe_load(open(sys.argv[1]))['models']]" "$plan")
stamp "training ${#pids[@]} baselines"
for pid in "${pids[@]}"; do wait "$pid" || { stamp "a baseline failed"; tail -20 "$out"/*-train.log; exit 1; }; done
stamp "baselines ready"
pids=()
for plan_file in "$out"/plans/*.yaml; do
    name=$(basename "$plan_file" .yaml)
    split=test; case $name in *-val-*) split=val;; esac
    $py bench/double_prune.py --sweep "$plan_file" --split "$split" --device "$device" --out "$out/$name" \
        >"$out/$name.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
stamp "sweeps finished (status $status)"
models=$($py -c "import sys,yaml; print(' '.join(m['name'] for m in yaml.safe_load(open(sys.argv[1]))['models']))" "$plan")
$py bench/double_prune.py --merge $(for m in $models; do echo "$out/$m"; done) --out "$out/all" | tail -25
for name in mnv2-val-floor05 mnv2-val-floor25; do echo "== $name"; cat "$out/$name/sweep.md"; done
exit $status
