"""``sp-extract sfm``: a folder of photos to a COLMAP model in one call, grown by later calls.

Five stages through the stages' Python API, into a work folder: extract (``feats.h5``), pairs
(``pairs.txt``), match (``matches.h5``), database (``database.db``), map (``sparse/N``). Every
stage resumes, so the same call finishes an interrupted or failed run, and a call after new
photos arrived does only their work: the images without features are extracted; pairs are made
only for the images the database lacks (exhaustive: with every image; sequential: the window
at the end of the name order; retrieval: their nearest images among all); the match store
matches only unmatched pairs; the database gains the new images and pairs (``grow``), and the
incremental mapper continues the previous model, followed by global bundle adjustment (a
globally mapped model is solved again once enough photos were added: ``grow.plan_mapping``);
``export`` formats are then written from the largest model into ``export/FORMAT`` (``handoff``), again when it
changed; the run's summary goes to ``sfm-run.json`` and the page of the run to ``report.html``
(``page``). ``rebuild`` maps from scratch (and starts the stores over when photos changed). Photos
are fingerprinted (``photos``): a changed photo stops the run (its features would silently be
wrong), a deleted one is reported and stays in the model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError, StoreError
from ..extraction.config import ExtractConfig
from ..extraction.discover import discover_images, unpairable
from ..extraction.tiling import parse_tile
from ..matching.config import MatchConfig
from ..pairs.core import (
    Pair,
    exhaustive_pairs,
    merge_pairs,
    read_pairs,
    sequential_pairs,
    write_pairs,
)
from ..processes import start_child_server
from ..report import Report, Summary, counted, listed, warn
from ..store.atomic import recover_folder
from ..store.catalog import read_store_info
from .colmap import check_camera_model, check_database
from .config import (
    EXHAUSTIVE_UP_TO,
    RETRIEVAL_K,
    SEQUENTIAL_K,
    CameraOptions,
    ColmapRun,
    MapperOptions,
    check_camera_mode,
)
from .environment import import_pycolmap
from .grow import (
    DatabaseInputs,
    DatabaseUpdate,
    add_to_database,
    addition_failed,
    check_growth_settings,
    map_database,
    model_record,
    plan_mapping,
    read_models,
)
from .handoff import check_format, export_after_run
from .mapping import NO_MODEL, ModelStats, judged_wrong, unregistered_lines
from .page import RUN_RECORD, write_report
from .photos import PhotoManifest

STAGES = ("extract", "pairs", "match", "database", "map")
NAMES_SHOWN = 10  # names listed in the printed summary; the JSON report has them all


@dataclass
class SfmOptions:
    """The options of each stage that ``sfm`` passes through."""

    pairs: str = "auto"  # auto, exhaustive, sequential[:K], retrieval[:K] or a pairs file
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    weights: str | None = None
    tile: str | int = "auto"  # extract's tiling (see ``extraction.tiling``)
    backend: str = "auto"  # what runs the network (see ``extraction.backends``)
    match: MatchConfig = field(default_factory=MatchConfig)
    camera: CameraOptions = field(default_factory=CameraOptions)
    rebuild: bool = False
    export: tuple[str, ...] = ()  # formats written to WORK/export/FORMAT (``handoff``)
    report: bool = True  # WORK/report.html (``page``)
    device: str = "auto"
    colmap: ColmapRun = field(default_factory=ColmapRun)  # seed, threads and log of COLMAP's steps
    mapper: MapperOptions = field(default_factory=MapperOptions)  # incremental, global or auto
    quiet: bool = True

    def __post_init__(self) -> None:
        parse_tile(self.tile)  # a bad --tile or --export is refused before any stage runs
        for fmt in self.export:
            check_format(fmt)


@dataclass
class SfmSummary(Report):
    """What one ``sfm`` run did; ``to_dict`` is the ``--json-report`` content."""

    command: str = field(default="sfm", kw_only=True)
    images_dir: str
    work: str
    mode: str = "new"  # new (first run), grow, rebuild, up to date
    pairs_mode: str = ""
    images: int = 0  # photos in the folder
    new_images: int = 0  # photos the database did not hold
    added_images: list[str] = field(default_factory=list)  # their names
    extracted: int = 0
    failed_images: list[dict[str, str]] = field(default_factory=list)
    deleted_images: list[str] = field(default_factory=list)
    pairs: int = 0  # in pairs.txt
    new_pairs: int = 0
    matched_pairs: int = 0  # matched in this run
    verified_pairs: int = 0  # verified in this run
    database_images: int = 0
    # what mapped: incremental or global (from scratch), continued (the new images registered into
    # the model, then bundle adjustment), the record's when up to date
    mapper: str = ""
    mapped_again: str = ""  # why a grown global model was mapped again from scratch
    registered: int = 0  # in the largest model
    points3D: int = 0
    mean_reprojection_error_px: float = 0.0
    models: list[ModelStats] = field(default_factory=list)
    unregistered_images: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)  # export folders written or up to date
    report: str = ""  # the report page
    stage_times_s: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False

    def body(self) -> list[str]:
        lines = [
            f"sfm: {self.work} ({self.mode}): {counted(self.images, 'photo')}, {self.new_images} new, "
            f"{self.extracted} extracted, {len(self.failed_images)} failed, "
            f"{len(self.deleted_images)} deleted",
            f"pairs ({self.pairs_mode}): {self.pairs} in pairs.txt, {self.new_pairs} new, "
            f"{self.matched_pairs} matched, {self.verified_pairs} verified in this run",
        ]
        if self.models:
            lines.append(
                f"model {self.models[0].path}: {self.registered}/{self.database_images} images registered, "
                f"{self.points3D} 3D points, mean reprojection error "
                f"{self.mean_reprojection_error_px:.3f} px, mapper: {self.mapper}"
                + (
                    f" ({counted(len(self.models) - 1, 'smaller model')} beside it)"
                    if len(self.models) > 1
                    else ""
                )
            )
        elif not self.interrupted:
            lines.append(NO_MODEL)
        lines += [f"map: {self.mapped_again}"] if self.mapped_again else []
        lines += unregistered_lines(self.unregistered_images, NAMES_SHOWN)
        lines += [f"export: {path}" for path in self.exports]
        lines += [f"report: {self.report}"] if self.report else []
        lines += [f"failed: {f['name']}: {f['reason']}" for f in self.failed_images[:NAMES_SHOWN]]
        times = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.stage_times_s.items())
        lines.append(
            f"wall time {self.wall_time_s:.1f} s ({times})" + (" (interrupted)" if self.interrupted else "")
        )
        return lines


def parse_pairs(spec: str) -> tuple[str, int | Path | None]:
    """``--pairs``: (kind, K or pairs file); kind is auto, exhaustive, sequential, retrieval or file."""
    kind, _, value = spec.partition(":")
    if kind in ("auto", "exhaustive") and not value:
        return kind, None
    if kind in ("sequential", "retrieval"):
        try:
            k = int(value) if value else SEQUENTIAL_K if kind == "sequential" else RETRIEVAL_K
        except ValueError:
            k = 0
        if k < 1:
            raise ConfigError(f"--pairs {spec}: K must be a positive integer ({kind}:K)")
        return kind, k
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"--pairs {spec}: neither exhaustive, sequential[:K], retrieval[:K] nor an existing pairs file"
        )
    return "file", path


def plan_pairs(
    spec: str, features: Path, names: list[str], new: list[str], work: Path, known: set[str], device: str
) -> tuple[str, list[Pair]]:
    """The pairs that involve an image of ``new`` among ``names`` (all pairs when every image is
    new), and the kind that made them (``auto``: exhaustive up to ``EXHAUSTIVE_UP_TO`` images)."""
    kind, value = parse_pairs(spec)
    if kind == "auto":
        kind, value = ("exhaustive", None) if len(names) <= EXHAUSTIVE_UP_TO else ("retrieval", RETRIEVAL_K)
    label = kind if value is None or kind == "file" else f"{kind}:{value}"
    fresh, added = set(new), set(new)
    if not new:
        return label, []
    everything = len(new) == len(names)
    if kind == "exhaustive":
        old = [name for name in names if name not in fresh]
        pairs = [(a, b) for a in old for b in new] + exhaustive_pairs(new)
    elif kind == "sequential":
        pairs = [pair for pair in sequential_pairs(names, int(value)) if added & set(pair)]
    elif kind == "retrieval":
        pairs = _retrieval(features, names, new, work, int(value), everything, device)
    else:
        usable = set(names)
        listed_pairs = read_pairs(Path(value), known)
        pairs = [pair for pair in listed_pairs if usable.issuperset(pair) and added & set(pair)]
    return label, pairs


def _retrieval(
    features: Path, names: list[str], new: list[str], work: Path, k: int, everything: bool, device: str
) -> list[Pair]:
    """Retrieval pairs among ``names`` (the store may hold more: deleted photos) of every image
    (``everything``, with the pairs that connect the graph's components) or of the new ones."""
    from ..pairs.retrieval import RetrievalOptions, retrieval_pairs

    if len(names) < 2:
        return []
    queries, database = work / f".new-images.{os.getpid()}.txt", work / f".all-images.{os.getpid()}.txt"
    try:
        queries.write_text("".join(name + "\n" for name in new), encoding="utf-8")
        database.write_text("".join(name + "\n" for name in names), encoding="utf-8")
        search = RetrievalOptions(k, query_list=queries, db_list=database, connect=everything)
        return retrieval_pairs(features, search, device=device)
    finally:
        queries.unlink(missing_ok=True)
        database.unlink(missing_ok=True)


def remove_store(path: Path) -> None:
    """A store and what lives beside it (``STORE.parts/``, ``STORE.retrieval/``, its lock)."""
    for found in [path, *path.parent.glob(path.name + ".*")]:
        if found.is_dir():
            shutil.rmtree(found)
        else:
            found.unlink(missing_ok=True)


class Stages:
    """The time of each stage, and a line naming it when it starts (unless quiet)."""

    def __init__(self, summary: SfmSummary, quiet: bool) -> None:
        self.summary, self.quiet = summary, quiet

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.quiet:
            step = f" [{STAGES.index(name) + 1}/{len(STAGES)}]" if name in STAGES else ":"  # after the five
            print(f"sfm{step} {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            yield
        finally:
            self.summary.stage_times_s[name] = round(time.monotonic() - started, 3)


@dataclass
class SfmRun:
    """One ``sfm`` run: its folders and options, the summary its stages fill in, and their timer."""

    images: Path
    work: Path
    options: SfmOptions
    summary: SfmSummary
    stage: Stages
    started: float
    # what the stages write into the work folder
    feats: Path = field(init=False)
    pairs_file: Path = field(init=False)
    matches: Path = field(init=False)
    database: Path = field(init=False)
    sparse: Path = field(init=False)

    def __post_init__(self) -> None:
        self.feats, self.pairs_file, self.matches = (
            self.work / "feats.h5",
            self.work / "pairs.txt",
            self.work / "matches.h5",
        )
        self.database, self.sparse = self.work / "database.db", self.work / "sparse"


@dataclass
class Photos:
    """What the extract stage leaves to the next: the folder's photos, those with features, those
    that can be paired (with features, no white space in the name), and those deleted since
    their features were extracted."""

    names: list[str]
    in_store: set[str]
    usable: list[str]
    deleted: list[str]


def run_sfm(images: Path | str, work: Path | str, options: SfmOptions | None = None) -> SfmSummary:
    """Build or grow the COLMAP model of the photos of ``images`` in the folder ``work`` (module doc).

    Raises ``ConfigError`` for bad options, a changed photo (without ``rebuild``) or a missing
    pycolmap, ``StoreError`` for unusable stores. An interrupted extraction or matching returns
    the summary with ``interrupted`` set and the signal's exit code; an interrupted database or
    mapping step raises ``KeyboardInterrupt`` with nothing half-written left behind.
    """
    run = _start(Path(images), Path(work), options or SfmOptions(), time.monotonic())
    summary, stage = run.summary, run.stage
    with stage("extract"):
        photos, extracted = _extract_stage(run)
    if extracted.interrupted:
        return _finish(summary, run.started, extracted.exit_code)
    with stage("pairs"):
        new, planned = _pairs_stage(run, photos)
    with stage("match"):
        matched = _match_stage(run)
    if matched.interrupted:
        return _finish(summary, run.started, matched.exit_code)
    with stage("database"):
        update = _database_stage(run, new, planned)
    with stage("map"):
        found = _map_stage(run, update)
    _record_models(summary, found, photos.usable)
    if found and run.options.export:
        with stage("export"):
            summary.exports = _export_stage(run)
    wrong = not found or judged_wrong(summary.models[0], run.options.colmap.seed, summary.notes)
    failed = wrong or summary.failed_images or matched.failed
    _finish(summary, run.started, EXIT_SOME_FAILED if failed else EXIT_OK)
    summary.write_json(run.work / RUN_RECORD)  # what ``sp-extract report`` shows of the run
    if run.options.report:
        with stage("report"):
            summary.report = str(write_report(run.work, run.images))
        summary.wall_time_s = round(time.monotonic() - run.started, 3)
    return summary


def _start(images: Path, work: Path, options: SfmOptions, started: float) -> SfmRun:
    """Check the options (the camera model against pycolmap's), make the work folder, put back
    the models a killed run left aside, and start the fork server of the child processes."""
    if not images.is_dir():
        raise ConfigError(f"{images}: no such image folder")
    import_pycolmap()
    camera_model = check_camera_model(options.camera.camera_model)
    check_camera_mode(options.camera.camera_mode)
    parse_pairs(options.pairs)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{work}: cannot create the work folder ({error.strerror or error})") from error
    options = replace(options, camera=replace(options.camera, camera_model=camera_model))
    summary = SfmSummary(str(images), str(work))
    run = SfmRun(images, work, options, summary, Stages(summary, options.quiet), started)
    recover_folder(run.sparse)
    # the fork server of the decoding workers and COLMAP's children imports their modules while
    # the features are extracted
    start_child_server("sp_extract.extraction.loader", "sp_extract.sfm.colmap", "sp_extract.sfm.grow")
    return run


def _extract_stage(run: SfmRun) -> tuple[Photos, Summary]:
    """Fingerprint the photos (a changed one stops the run, or with ``rebuild`` starts the stores
    over) and extract the features of those the store lacks."""
    from ..extraction.config import ExtractRun
    from ..extraction.pipeline import extract

    options, summary, feats = run.options, run.summary, run.feats
    names = discover_images(run.images)
    summary.images = len(names)
    manifest = PhotoManifest(run.work)
    # forget photos fingerprinted by a run that failed before their features were stored
    manifest.keep_only(set(read_store_info(feats, "features")[1]) if feats.is_file() else set())
    check = manifest.check(run.images, names)
    if check.changed and not options.rebuild:
        more = f" (and {counted(len(check.changed) - 1, 'other photo')})" if len(check.changed) > 1 else ""
        raise ConfigError(
            f"{run.images / check.changed[0]}: changed since its features were extracted{more}; its "
            "features, matches and place in the model describe the old photo: run again with --rebuild"
        )
    if check.changed:  # --rebuild: the stores start over
        for store in (feats, run.matches):
            remove_store(store)
        manifest.entries, check.new = {}, names
    manifest.record(run.images, check.new)
    manifest.save()
    extract_run = ExtractRun(
        options.weights, options.device, quiet=options.quiet, backend=options.backend, tile=options.tile
    )
    extracted = extract(run.images, feats, options.extract, extract_run)
    summary.extracted, summary.failed_images = extracted.done, extracted.failed
    _, stored = read_store_info(feats, "features")
    manifest.keep_only(set(stored))
    manifest.save()
    in_store, spaced = set(stored), set(unpairable(names))  # spaced: warned about by extract
    usable = [name for name in names if name in in_store and name not in spaced]
    return Photos(names, in_store, usable, check.deleted), extracted


def _pairs_stage(run: SfmRun, photos: Photos) -> tuple[list[str], list[Pair]]:
    """Choose the run's mode (new, grow, rebuild), plan the pairs of the images the database
    lacks and merge them into ``pairs.txt``; returns those images and their pairs."""
    summary, database, pairs_file = run.summary, run.database, run.pairs_file
    held = check_database(database) if database.exists() else []
    summary.mode = _mode(run, held, photos.in_store)
    if summary.mode == "grow":
        check_growth_settings(database, run.options.camera, run.options.colmap)
    summary.deleted_images = [name for name in photos.deleted if name in set(held)]
    if summary.deleted_images:
        fate = "kept in" if summary.mode == "grow" else "dropped from"
        warn(
            f"{counted(len(summary.deleted_images), 'photo')} deleted since extracted: "
            f"{listed(summary.deleted_images)}; {fate} the database and model"
            + (" (--rebuild drops them)" if summary.mode == "grow" else "")
        )
    known = set(held) if summary.mode == "grow" else set()
    new = [name for name in photos.usable if name not in known]
    summary.new_images, summary.added_images = len(new), new
    summary.pairs_mode, planned = plan_pairs(
        run.options.pairs,
        run.feats,
        photos.usable,
        new,
        run.work,
        photos.in_store | set(photos.names),
        run.options.device,
    )
    summary.new_pairs = len(planned)
    if planned:
        grown = pairs_file.is_file() and summary.mode == "grow"
        keep = read_pairs(pairs_file, photos.in_store) if grown else []
        write_pairs(merge_pairs(keep, planned), pairs_file)
    if not pairs_file.is_file():
        raise ConfigError(f"{run.images}: fewer than 2 photos with features; nothing to pair")
    return new, planned


def _mode(run: SfmRun, held: list[str], in_store: set[str]) -> str:
    """new (no database), grow (a database to add to), or rebuild (asked for, or a database a run
    failed to add images to); a database holding images without features is refused."""
    rebuild, database = run.options.rebuild, run.database
    if held and not rebuild and addition_failed(database):
        warn(f"{database}: a run failed while adding images to it; the database and model are rebuilt")
        return "rebuild"
    if held and not rebuild:
        strangers = sorted(set(held) - in_store)
        if strangers:
            raise StoreError(
                f"{database}: holds {counted(len(strangers), 'image')} without features in {run.feats} "
                f"(e.g. '{strangers[0]}'); run with --rebuild"
            )
        return "grow"
    return "rebuild" if rebuild else "new"


def _match_stage(run: SfmRun) -> Summary:
    """Match the pairs of ``pairs.txt`` that the match store lacks."""
    from ..matching.config import MatchRun
    from ..matching.run import match_pairs

    options, summary = run.options, run.summary
    matched = match_pairs(
        run.pairs_file, run.feats, run.matches, options.match, MatchRun(options.device, quiet=options.quiet)
    )
    summary.pairs, summary.matched_pairs = matched.total, matched.done
    if matched.failed:
        warn(f"{counted(len(matched.failed), 'pair')} could not be matched")
    return matched


def _database_stage(run: SfmRun, new: list[str], planned: list[Pair]) -> DatabaseUpdate:
    """Add the new images and the planned pairs to the database (a new one unless growing)."""
    update = add_to_database(
        run.database,
        DatabaseInputs(run.images, run.feats, run.matches),
        new,
        planned,
        run.options.camera,
        fresh=run.summary.mode != "grow",
        run=run.options.colmap,
    )
    run.summary.verified_pairs = update.pairs_verified
    run.summary.database_images = update.state.images
    return update


def _map_stage(run: SfmRun, update: DatabaseUpdate) -> list[tuple[ModelStats, dict[int, str]]]:
    """Map the database (continuing the model when growing), or read the models when nothing
    changed since they were made."""
    summary, sparse, state = run.summary, run.sparse, update.state
    record = model_record(sparse)
    grow = summary.mode == "grow" and (record or {}).get("database_id") == state.identity
    if grow and state.mapped_in(record):  # nothing new since the model was made
        summary.mode, summary.mapper = "up to date", (record or {}).get("mapper", "incremental")
        return read_models(sparse, run.database)
    plan = plan_mapping(sparse, state, grow, run.options.mapper)
    summary.mapper = "continued" if plan.previous else plan.mapper
    if plan.reason:
        summary.mapped_again = plan.reason
    return map_database(run.database, run.images, sparse, state, plan, run.options.mapper, run.options.colmap)


def _record_models(
    summary: SfmSummary, found: list[tuple[ModelStats, dict[int, str]]], usable: list[str]
) -> None:
    """The models into the summary: their statistics, the largest's figures, and the photos no
    model registered."""
    summary.models = [stats for stats, _ in found]
    registered = {name for _, names_by_id in found for name in names_by_id.values()}
    summary.unregistered_images = [name for name in usable if name not in registered]
    if found:
        best = summary.models[0]
        summary.registered, summary.points3D = best.registered_images, best.points3D
        summary.mean_reprojection_error_px = best.mean_reprojection_error_px


def _export_stage(run: SfmRun) -> list[str]:
    """The largest model in the ``export`` formats, in ``WORK/export/FORMAT``."""
    options = run.options
    return export_after_run(
        run.sparse / "0",
        run.images,
        run.work / "export",
        options.export,
        options.colmap.num_threads,
        options.colmap.verbose,
    )


def _finish(summary: SfmSummary, started: float, exit_code: int) -> SfmSummary:
    summary.interrupted = exit_code > EXIT_SOME_FAILED
    summary.exit_code = exit_code
    summary.wall_time_s = round(time.monotonic() - started, 3)
    return summary
