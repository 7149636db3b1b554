"""Where extract and match-pairs run: here, one shard of their work here (``--shard``), or as
shards on a Dask cluster (``--scheduler``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import cluster_target

if TYPE_CHECKING:
    from ..report import Summary

CLUSTER_OPTIONS = ("shard", "shards", "scheduler")  # the options of ``cluster_options``


def run_here_or_on_cluster(
    local: Callable[..., Summary],
    on_cluster: Callable[..., Summary],
    inputs: tuple[Path, ...],
    out: Path,
    config: Any,
    run: Any,
    cluster: dict[str, Any],
) -> Summary:
    """``local(*inputs, out, config, run)`` (``extract`` or ``match_pairs``), or of one shard of the
    work into the shard's store (``--shard``), or ``on_cluster(scheduler, shards, *inputs, out,
    config, run)`` (``--scheduler``); ``cluster``: the values of ``--shard``, ``--shards`` and
    ``--scheduler`` (``cluster_options``), checked by ``cluster_target``."""
    target, chosen = cluster_target(out, **cluster)
    if cluster["scheduler"] is not None:
        return on_cluster(cluster["scheduler"], cluster["shards"], *inputs, out, config, run)
    return local(*inputs, target, config, dataclasses.replace(run, shard=chosen))
