"""Matcher settings: validated options, recorded in the match store and checked on resume
(``MatchConfig``), and those of how one match-pairs run goes (``MatchRun``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError
from ..shards import Shard

MATCHERS = ("nn", "superglue", "lightglue")
# each learned matcher's options and their defaults (those of Magic Leap's and cvg's code), defined
# here once: the networks' own defaults (superglue.py, lightglue.py) and the CLI's help read them
LEARNED_OPTIONS = {
    "superglue": {"sinkhorn_iterations": 100, "match_threshold": 0.2},
    "lightglue": {"depth_confidence": 0.95, "width_confidence": 0.99, "filter_threshold": 0.1},
}
VERIFY_MIN_MATCHES = {"fundamental": 8, "homography": 4}  # fewer matches cannot be verified
# each field's ``help`` (and ``choices``) is what the CLI shows; ``cli/options.py`` builds the options


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _learned(matcher: str, name: str, help: str, note: str = "") -> Any:
    """A learned matcher's option: None for its default (from LEARNED_OPTIONS, shown in the help)."""
    label = {"superglue": "SuperGlue", "lightglue": "LightGlue"}[matcher]
    default = LEARNED_OPTIONS[matcher][name]
    return field(default=None, metadata={"help": f"{label}: {help} [default: {default}{note}]."})


@dataclass(frozen=True)
class MatchConfig:
    """Matcher settings; recorded in the match store and checked on resume (those that play a
    part: see ``settings``; a learned matcher's weights by their identity)."""

    mutual: bool = field(default=True, metadata={"help": "Keep only mutual nearest neighbours."})
    ratio: float | None = field(
        default=None, metadata={"help": "Lowe's ratio test on descriptor distances (hloc NN-ratio: 0.8)."}
    )
    max_distance: float | None = field(
        default=None,
        metadata={"help": "Largest L2 distance of unit descriptors (hloc NN-superpoint: 0.7)."},
    )
    verify: str | None = field(
        default=None,
        metadata={
            "choices": tuple(VERIFY_MIN_MATCHES),
            "help": "Keep only inliers of a fundamental matrix or homography (OpenCV USAC MAGSAC).",
        },
    )
    verify_threshold: float = field(default=4.0, metadata={"help": "Largest inlier error for --verify (px)."})
    matcher: str = field(
        default="nn",
        metadata={
            "choices": MATCHERS,
            "help": "nn: nearest neighbours; superglue, lightglue: the learned matchers (see README).",
        },
    )
    matcher_weights: str | None = field(
        default=None,
        metadata={
            "metavar": "NAME|PATH",
            "help": "superglue-outdoor (default), superglue-indoor, lightglue-superpoint (default), or a "
            ".pth / transformers checkpoint (.safetensors, .bin) of either project.",
        },
    )
    sinkhorn_iterations: int | None = _learned(
        "superglue", "sinkhorn_iterations", "Sinkhorn iterations", "; hloc uses 50"
    )
    match_threshold: float | None = _learned("superglue", "match_threshold", "smallest match score kept")
    depth_confidence: float | None = _learned(
        "lightglue", "depth_confidence", "stop a pair early when this share of keypoints is confident, -1 off"
    )
    width_confidence: float | None = _learned(
        "lightglue", "width_confidence", "prune keypoints unlikely to match (adaptive width), -1 off"
    )
    filter_threshold: float | None = _learned("lightglue", "filter_threshold", "smallest match score kept")

    def __post_init__(self) -> None:
        if self.matcher not in MATCHERS:
            raise ConfigError(f"--matcher must be one of {', '.join(MATCHERS)}, got {self.matcher}")
        self._check_learned_options()
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.max_distance is not None and not 0.0 < self.max_distance <= 2.0:
            raise ConfigError(
                f"--max-distance must be in (0, 2] (L2 distance of unit descriptors), got {self.max_distance}"
            )
        if self.verify is not None and self.verify not in VERIFY_MIN_MATCHES:
            raise ConfigError(f"--verify must be one of {', '.join(VERIFY_MIN_MATCHES)}, got {self.verify}")
        if self.verify_threshold <= 0:
            raise ConfigError(f"--verify-threshold must be > 0 pixels, got {self.verify_threshold}")

    def _check_learned_options(self) -> None:
        learned = LEARNED_OPTIONS.get(self.matcher, {})
        if self.matcher == "nn" and self.matcher_weights is not None:
            raise ConfigError("--matcher-weights needs --matcher superglue or lightglue")
        if self.matcher != "nn" and (
            not self.mutual or self.ratio is not None or self.max_distance is not None
        ):
            raise ConfigError("--no-mutual, --ratio and --max-distance apply to --matcher nn only")
        for name in (n for options in LEARNED_OPTIONS.values() for n in options):
            if getattr(self, name) is not None and name not in learned:
                users = " or ".join(m for m, options in LEARNED_OPTIONS.items() if name in options)
                raise ConfigError(f"{_option(name)} applies to --matcher {users} only")
        options = self.learned_options()
        if options.get("sinkhorn_iterations", 1) < 1:
            raise ConfigError(f"--sinkhorn-iterations must be >= 1, got {self.sinkhorn_iterations}")
        for name in ("match_threshold", "filter_threshold"):
            if name in options and not 0.0 <= options[name] < 1.0:
                raise ConfigError(f"{_option(name)} must be in [0, 1), got {options[name]}")
        for name in ("depth_confidence", "width_confidence"):
            if name in options and options[name] != -1 and not 0.0 < options[name] <= 1.0:
                raise ConfigError(f"{_option(name)} must be in (0, 1], or -1 for off, got {options[name]}")

    def learned_options(self) -> dict[str, Any]:
        """The learned matcher's options, defaults filled in (empty for ``nn``)."""
        defaults = LEARNED_OPTIONS.get(self.matcher, {})
        return {
            name: default if getattr(self, name) is None else getattr(self, name)
            for name, default in defaults.items()
        }

    def settings(self) -> dict[str, Any]:
        """The settings as recorded; the threshold only counts when verification is on. Nearest
        neighbours record what they always did; a learned matcher records itself and its
        options (``match_pairs`` adds its weights' identity) instead of the NN options."""
        settings = asdict(self)
        for name in (
            "matcher",
            "matcher_weights",
            *(n for options in LEARNED_OPTIONS.values() for n in options),
        ):
            del settings[name]
        if self.verify is None:
            settings["verify_threshold"] = None
        if self.matcher != "nn":
            for name in ("mutual", "ratio", "max_distance"):
                del settings[name]
            settings.update(matcher=self.matcher, **self.learned_options())
        return settings


@dataclass(frozen=True)
class MatchRun:
    """How one match-pairs run goes, beside its settings (``MatchConfig``): none of it changes the
    matches or is recorded in the store."""

    device: str = "auto"
    batch_size: int = field(default=32, metadata={"help": "Pairs per matching batch."})
    cache_mb: int = field(default=1024, metadata={"help": "Memory for descriptors kept between pairs (MiB)."})
    overwrite: bool = False  # start the store afresh instead of resuming
    quiet: bool = True  # no progress output
    shard: Shard | None = None  # match only the pairs of this shard (``sp_extract.shards``)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.cache_mb < 1:
            raise ConfigError(f"--cache-mb must be >= 1, got {self.cache_mb}")
