#!/usr/bin/env bash
# A collection on a SLURM cluster with job arrays: every step a job, each waiting for the one
# before (--dependency=afterok), every array task one shard (--shard auto).
#   examples/cluster/slurm_array.sh IMAGES_DIR WORK_DIR [SHARDS]
# IMAGES_DIR and WORK_DIR must be on storage every node sees (docs/cluster.md "Shared storage, NFS and locks":
# NFS needs working POSIX locks). Adjust the #SBATCH-style options (partition, GPUs, time) to
# your site. Steps:
#   1. extract:  SHARDS array tasks, each WORK_DIR/feats.h5.shards/K-of-N.h5
#   2. merge the feature shards into WORK_DIR/feats.h5, write retrieval pairs
#   3. match:    SHARDS array tasks against the merged features, WORK_DIR/matches.h5.shards/
#   4. merge the match shards into WORK_DIR/matches.h5, write the COLMAP database
# A failed array task fails its step and the later steps never start: run that task again
# (sbatch --array=K ...), its shard resumes; then submit the later steps again.
set -euo pipefail
if [[ $# -lt 2 || $1 == -* ]]; then
    echo "usage: $0 IMAGES_DIR WORK_DIR [SHARDS]" >&2
    exit 2
fi
images=$1
work=$2
shards=${3:-16}
mkdir -p "$work/logs"
gpu_job=(--gres=gpu:1 --cpus-per-task=8 --mem=32G --time=04:00:00)
cpu_job=(--cpus-per-task=8 --mem=32G --time=04:00:00)

# --array=1-N or 0-(N-1): --shard auto counts the tasks from the array's first index either way
extract=$(sbatch --parsable --job-name=sp-extract "${gpu_job[@]}" --array=1-"$shards" \
    --output="$work/logs/extract-%A_%a.log" \
    --wrap="sp-extract extract '$images' --out '$work/feats.h5' --shard auto --quiet")

pairs=$(sbatch --parsable --job-name=sp-merge-features "${cpu_job[@]}" \
    --dependency=afterok:"$extract" --output="$work/logs/merge-features-%j.log" \
    --wrap="sp-extract merge '$work/feats.h5' '$work/feats.h5.shards/' && sp-extract pairs retrieval --features '$work/feats.h5' --num-matched 20 --out '$work/pairs.txt'")

match=$(sbatch --parsable --job-name=sp-match "${gpu_job[@]}" --array=1-"$shards" \
    --dependency=afterok:"$pairs" --output="$work/logs/match-%A_%a.log" \
    --wrap="sp-extract match-pairs '$work/pairs.txt' --features '$work/feats.h5' --out '$work/matches.h5' --shard auto --quiet")

sbatch --parsable --job-name=sp-merge-matches "${cpu_job[@]}" \
    --dependency=afterok:"$match" --output="$work/logs/merge-matches-%j.log" \
    --wrap="sp-extract merge '$work/matches.h5' '$work/matches.h5.shards/' --pairs '$work/pairs.txt' && sp-extract colmap --images '$images' --features '$work/feats.h5' --matches '$work/matches.h5' --database '$work/database.db'"
echo "submitted: extract $extract, merge $pairs, match $match (logs in $work/logs)"
