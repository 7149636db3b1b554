"""Extraction and matching driven from one command on a SLURM cluster through dask-jobqueue.

    python examples/cluster/dask_jobqueue_slurm.py IMAGES_DIR WORK_DIR [--jobs 16]

dask-jobqueue (pip install dask-jobqueue; PBSCluster, SGECluster, LSFCluster work alike)
submits SLURM jobs that each run one Dask worker with one GPU; sp-extract's driver (this
process, on a login node) sends one task a shard to them and merges the shards into
WORK_DIR/feats.h5 and WORK_DIR/matches.h5. WORK_DIR must be on storage every node sees.
Adjust queue, account, walltime and memory to your site.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def run() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--jobs", type=int, default=16, help="SLURM jobs (one GPU worker each)")
    args = parser.parse_args()
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        sys.exit(
            "dask_jobqueue_slurm.py: error: needs dask-jobqueue: pip install dask-jobqueue 'sp-extract[dask]'"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    features, pairs, matches = (str(args.work / name) for name in ("feats.h5", "pairs.txt", "matches.h5"))
    cluster = SLURMCluster(
        cores=1,  # one Dask thread a worker: one shard (one GPU) at a time
        processes=1,
        job_cpu=8,  # CPU cores booked a job, for image decoding
        memory="32GB",
        walltime="04:00:00",
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1"],
        log_directory=str(args.work / "logs"),
    )
    cluster.scale(jobs=args.jobs)
    try:
        address = cluster.scheduler_address
        steps = [
            ["sp-extract", "extract", str(args.images), "--out", features, "--scheduler", address],
            [
                "sp-extract",
                "pairs",
                "retrieval",
                "--features",
                features,
                "--num-matched",
                "20",
                "--out",
                pairs,
            ],
            [
                "sp-extract",
                "match-pairs",
                pairs,
                "--features",
                features,
                "--out",
                matches,
                "--scheduler",
                address,
            ],
        ]
        for step in steps:
            code = subprocess.run(step).returncode
            if code not in (0, 1):  # 1: some images (pairs) failed, listed; the rest is done
                sys.exit(code)
    finally:
        cluster.close()


if __name__ == "__main__":
    run()
