#!/usr/bin/env bash
# From a folder of photos to a sparse COLMAP model with sp-extract's five commands.
# (sp-extract sfm IMAGES_DIR WORK_DIR runs all five in one command and grows the model on re-runs.)
#   examples/sfm_colmap.sh IMAGES_DIR [WORK_DIR] [extra extraction options, e.g. --subpixel]
# Needs the COLMAP extra: pip install 'sp-extract[colmap]'. The models land in WORK_DIR/sparse/N
# in COLMAP's binary format; open them with COLMAP's GUI or pycolmap.Reconstruction.
# WORK_DIR defaults to ./sfm; options may follow IMAGES_DIR directly (examples/sfm_colmap.sh
# photos/ --subpixel).
set -euo pipefail
usage="usage: $0 IMAGES_DIR [WORK_DIR] [extraction options...]"
if [[ $# -lt 1 || $1 == -* ]]; then
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        echo "$usage"
        exit 0
    fi
    echo "$usage" >&2
    exit 2
fi
images=$1
shift
work=sfm
if [[ $# -gt 0 && $1 != -* ]]; then  # a WORK_DIR, not an option
    work=$1
    shift
fi
mkdir -p "$work"

sp-extract "$images" --out "$work/feats.h5" "$@"
sp-extract pairs exhaustive --features "$work/feats.h5" --out "$work/pairs.txt"
sp-extract match-pairs "$work/pairs.txt" --features "$work/feats.h5" --out "$work/matches.h5"
sp-extract colmap --images "$images" --features "$work/feats.h5" --matches "$work/matches.h5" \
    --database "$work/database.db"
sp-extract reconstruct --database "$work/database.db" --images "$images" --out "$work/sparse" \
    --overwrite --json-report "$work/reconstruction.json"
