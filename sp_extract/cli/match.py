"""The ``match-pairs`` command: the features of every pair of a pairs file into a match store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..matching.config import MatchConfig, MatchRun
from .errors import finish_run, reports_errors
from .options import (
    FILE,
    cluster_options,
    config_from,
    device_option,
    file_option,
    match_options,
    option_from,
    out_option,
    run_options,
)
from .runs import CLUSTER_OPTIONS, run_here_or_on_cluster


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
@option_from(MatchRun, "batch_size")
@option_from(MatchRun, "cache_mb")
@device_option()
@cluster_options
@run_options
@reports_errors
def match_pairs(
    pairs_file: Path, features: Path, out: Path, json_report: Path | None, **options: Any
) -> None:
    """Match the features of every pair in PAIRS ('name0 name1' a line) into --out.

    Nearest neighbours with the mutual check, ratio test and distance threshold of hloc's NN
    matchers, or SuperGlue or LightGlue (--matcher), which also use the keypoints, their scores
    and the image sizes. The pairs file is streamed in checked chunks (any size starts at once).
    Re-running matches only the pairs not yet in the store; a store made with other settings,
    weights or features is refused.
    """
    from ..cluster.dask import match_on_cluster
    from ..matching.run import match_pairs as run_match_pairs

    config = config_from(MatchConfig, options)
    cluster = {name: options.pop(name) for name in CLUSTER_OPTIONS}
    run = MatchRun(**options)  # the rest: device, batch size, cache, ...
    inputs = (pairs_file, features)
    summary = run_here_or_on_cluster(run_match_pairs, match_on_cluster, inputs, out, config, run, cluster)
    finish_run(summary, json_report)
