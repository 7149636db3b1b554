#!/usr/bin/env bash
# One machine with several GPUs (8, say): one Dask worker per GPU, each seeing only its own GPU
# (CUDA_VISIBLE_DEVICES) and declaring a GPU resource, so every shard task gets a GPU to itself.
#   examples/cluster/one_node_gpus.sh IMAGES_DIR WORK_DIR [GPUS]
# The short form, when nothing else shares the machine:
#   sp-extract extract IMAGES_DIR --out WORK_DIR/feats.h5 --scheduler local:8
# (a local cluster of 8 workers, worker i on cuda:i). This script starts the workers itself,
# as you would to pin CPU cores or memory per worker, and stops them when it ends.
set -euo pipefail
if [[ $# -lt 2 || $1 == -* ]]; then
    echo "usage: $0 IMAGES_DIR WORK_DIR [GPUS]" >&2
    exit 2
fi
images=$1
work=$2
gpus=${3:-8}
mkdir -p "$work"
scheduler_file="$work/dask-scheduler.json"
rm -f "$scheduler_file"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
dask scheduler --scheduler-file "$scheduler_file" --no-dashboard &
pids+=($!)
for ((gpu = 0; gpu < gpus; gpu++)); do
    CUDA_VISIBLE_DEVICES=$gpu dask worker --scheduler-file "$scheduler_file" --nthreads 1 \
        --resources GPU=1 --name "gpu$gpu" --no-dashboard &
    pids+=($!)
done
while [[ ! -s $scheduler_file ]]; do sleep 1; done

sp-extract extract "$images" --out "$work/feats.h5" --scheduler "$scheduler_file"
sp-extract pairs retrieval --features "$work/feats.h5" --num-matched 20 --out "$work/pairs.txt"
sp-extract match-pairs "$work/pairs.txt" --features "$work/feats.h5" --out "$work/matches.h5" --scheduler "$scheduler_file"
