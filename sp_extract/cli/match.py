"""The ``match-pairs`` command: the features of every pair of a pairs file into a match store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..matching.config import MatchConfig
from .errors import finish_run, reports_errors
from .options import (
    FILE,
    cluster_options,
    cluster_target,
    config_from,
    device_option,
    file_option,
    match_options,
    out_option,
    run_options,
)


@click.command("match-pairs")
@click.argument("pairs_file", metavar="PAIRS", type=FILE)
@file_option("--features", "feats.h5", "Feature store to match.")
@out_option("matches.h5", "HDF5 match store to create or extend (hloc layout).")
@match_options(
    "mutual",
    "ratio",
    "max_distance",
    "verify",
    "verify_threshold",
    "matcher",
    "matcher_weights",
    "sinkhorn_iterations",
    "match_threshold",
    "depth_confidence",
    "width_confidence",
    "filter_threshold",
)
@click.option("--batch-size", default=32, show_default=True, help="Pairs per matching batch.")
@click.option(
    "--cache-mb", default=1024, show_default=True, help="Memory for descriptors kept between pairs (MiB)."
)
@device_option()
@cluster_options
@run_options
@reports_errors
def match_pairs(
    pairs_file: Path,
    features: Path,
    out: Path,
    shard: str | None,
    shards: int | None,
    scheduler: str | None,
    overwrite: bool,
    quiet: bool,
    json_report: Path | None,
    **options: Any,
) -> None:
    """Match the features of every pair in PAIRS ('name0 name1' a line) into --out.

    Nearest neighbours with the mutual check, ratio test and distance threshold of hloc's NN
    matchers, or SuperGlue or LightGlue (--matcher), which also use the keypoints, their scores
    and the image sizes. The pairs file is streamed in checked chunks (any size starts at once).
    Re-running matches only the pairs not yet in the store; a store made with other settings,
    weights or features is refused.
    """
    from ..matching.run import match_pairs as run_match_pairs

    config = config_from(MatchConfig, options)  # the rest: device, batch size, cache
    target, chosen = cluster_target(out, shard, shards, scheduler)
    if scheduler is not None:
        from ..cluster.dask import match_on_cluster

        summary = match_on_cluster(
            scheduler, pairs_file, features, out, config, shards, overwrite, quiet, **options
        )
    else:
        summary = run_match_pairs(
            pairs_file, features, target, config, overwrite=overwrite, quiet=quiet, shard=chosen, **options
        )
    finish_run(summary, json_report)
