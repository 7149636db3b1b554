"""The pycolmap environment every COLMAP step shares: importing pycolmap (with the install hint
of the ``[colmap]`` extra and the signal handlers kept), COLMAP's log level, its failures as
one-line errors, the geometric verification's options, and COLMAP's pixel convention.

pycolmap is an optional dependency (``pip install pycolmap``, or ``pip install
'sp-extract[colmap]'``), imported on use.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError, StoreError
from .config import ColmapRun

INSTALL_HINT = (
    "pycolmap is not installed; install it with: pip install pycolmap "
    "(or the COLMAP extra: pip install 'sp-extract[colmap]')"
)
MAX_IMAGE_ID = 2147483647  # COLMAP's pair id: image_id1 * MAX_IMAGE_ID + image_id2, id1 < id2
COLMAP_OFFSET = 0.5  # COLMAP puts the centre of the top-left pixel at (0.5, 0.5), hloc at (0, 0)
# hloc's verification settings for nearest-neighbour matches, which hold many outliers
VERIFY_MAX_TRIALS = 20_000
VERIFY_MIN_INLIER_RATIO = 0.1
VERIFY_MAX_ERROR = 4.0  # pixels: COLMAP's, an inlier's largest epipolar (Sampson) or transfer error


def import_pycolmap() -> ModuleType:
    """pycolmap, or a ``ConfigError`` saying how to install it.

    Importing pycolmap installs glog's failure handler for SIGTERM, which dumps a stack trace and
    kills the process on the spot; the SIGINT and SIGTERM handlers from before are put back, so
    an interrupted command still removes what it had half-written.
    """
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        import pycolmap
    except ImportError as error:
        raise ConfigError(INSTALL_HINT) from error
    finally:
        for signum, handler in handlers.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
    return pycolmap


@contextlib.contextmanager
def colmap_logging(verbose: bool) -> Iterator[None]:
    """COLMAP's own log lines on stderr only when ``verbose``: its failures reach the user as
    exceptions or counts, which the commands turn into their own one-line messages."""
    pycolmap = import_pycolmap()
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 0 if verbose else 3  # 3: FATAL, which aborts anyway
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous


@contextlib.contextmanager
def failures_reported(target: Path, action: str) -> Iterator[None]:
    """I/O errors and pycolmap's failures (``RuntimeError``) as one-line ``StoreError``s."""
    try:
        yield
    except OSError as error:
        raise StoreError(
            f"{target}: cannot {action} ({error.strerror or error}); {target} is unchanged"
        ) from error
    except RuntimeError as error:
        raise StoreError(f"{target}: COLMAP failed to {action} ({error}); {target} is unchanged") from error


def verification_options(run: ColmapRun) -> Any:
    """pycolmap's two-view geometry options with hloc's RANSAC settings for nearest-neighbour
    matches (``VERIFY_*``), ``run``'s floor of inliers, seeded by ``run``; also seeds pycolmap's
    global generator."""
    pycolmap = import_pycolmap()
    options = pycolmap.TwoViewGeometryOptions()
    options.ransac.max_num_trials = VERIFY_MAX_TRIALS
    options.ransac.max_error = VERIFY_MAX_ERROR
    options.ransac.min_inlier_ratio = VERIFY_MIN_INLIER_RATIO
    options.ransac.random_seed = run.seed
    options.min_num_inliers = run.min_inliers
    pycolmap.set_random_seed(run.seed)
    return options
