"""The store commands: ``merge`` (shards into one store), ``repair`` (salvage a damaged store) and
``compact`` (fold a store's segments into its main file)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from .errors import finish_run, reports_errors
from .options import FILE, out_option, report_option, run_options


@click.command()
@click.argument("out", type=FILE)
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--image-list",
    type=FILE,
    help="Feature stores: report the images listed (one a line) that no STORE holds.",
)
@click.option("--pairs", type=FILE, help="Match stores: report the pairs of this pairs file no STORE holds.")
@run_options
@reports_errors
def merge(
    out: Path,
    stores: tuple[Path, ...],
    image_list: Path | None,
    pairs: Path | None,
    overwrite: bool,
    quiet: bool,
    json_report: Path | None,
) -> None:
    """Merge the feature or match STOREs of one run (the shards of --shard, or folders of them
    such as OUT.shards/) into OUT, which is created or extended.

    The STOREs must have the same settings (the difference is named); an entry in several of them
    is kept once if equal, else refused. Exit 1 when a name of --image-list / --pairs, or a shard
    K-of-N of the series, is in none of them (the rest is merged). Crash-safe and resumable as
    every store; each STORE is locked while it is read.
    """
    from ..store.merge import merge_stores

    if image_list is not None and pairs is not None:
        raise ConfigError("--image-list (feature stores) and --pairs (match stores) exclude each other")
    summary = merge_stores(out, list(stores), image_list or pairs, overwrite=overwrite, quiet=quiet)
    finish_run(summary, json_report)


# -- reliability: salvaging damaged stores (issue 6) ------------------------------------------
@click.command()
@click.argument("store", type=FILE)
@out_option(None, "Repaired store to create (must not exist) [default: STORE.repaired.h5 beside STORE].")
@click.option(
    "--check",
    is_flag=True,
    help="Only check: read every dataset of STORE and its parts (every checksum), list the damaged "
    "entries; writes nothing.",
)
@report_option(help="Write what was copied and lost (with --check: what was found) as JSON to this file.")
@reports_errors
def repair(store: Path, out: Path | None, check: bool, json_report: Path | None) -> None:
    """Copy every readable, complete entry of a damaged STORE into a new store.

    For a store truncated or corrupted by a crash of some other program: entries whose
    datasets are all readable (checksums verified where present) are copied, with the store's
    settings, into --out, which appears atomically; each lost entry is reported. Results a
    killed sp-extract run left in STORE.parts/ are included. STORE itself is not changed.
    Exit 0: nothing lost, 1: some entries lost, 2: nothing could be read.
    With --check: exit 0 if every entry is intact, 1 if some are damaged (listed).
    """
    from ..store.repair import check_store, repair_store

    if check and out is not None:
        raise ConfigError("--check writes nothing: drop --out, or drop --check to repair")
    finish_run(check_store(store) if check else repair_store(store, out), json_report)


# -- scale: folding a store's segments into its main file (issue 11) ---------------------------
@click.command()
@click.argument("store", type=FILE)
@reports_errors
def compact(store: Path) -> None:
    """Fold STORE's segments (and a killed run's parts) into its main file.

    Runs that add to a large store write their entries to immutable segment files in
    STORE.segments/ instead of copying the whole store; every sp-extract command reads them.
    hloc and other HDF5 readers see only STORE itself: run this first. Crash-safe (a new copy of
    STORE replaces it atomically); on a store without segments or parts it does nothing.
    """
    from ..store.compact import compact_store

    segments, parts = compact_store(store)
    folded = (
        f"{segments} segment(s) and {parts} part file(s) folded into"
        if segments or parts
        else "nothing to fold:"
    )
    click.echo(f"compact: {folded} {store}", err=True)
