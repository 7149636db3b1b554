"""Matcher settings: validated options, recorded in the match store and checked on resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from .verify import VERIFY_MIN_MATCHES


@dataclass(frozen=True)
class MatchConfig:
    """Matcher settings; all are recorded in the match store and checked on resume."""

    mutual: bool = True
    ratio: float | None = None
    max_distance: float | None = None
    verify: str | None = None
    verify_threshold: float = 4.0

    def __post_init__(self) -> None:
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

    def settings(self) -> dict[str, Any]:
        """The settings as recorded; the threshold only counts when verification is on."""
        settings = asdict(self)
        if self.verify is None:
            settings["verify_threshold"] = None
        return settings
