"""Shards: a deterministic split of the work (images, or pairs) into N parts.

An item belongs to shard K of N (K = 1 .. N, as ``split -n K/N`` counts) by a stable hash of
its name (BLAKE2b, not Python's seeded ``hash``), so every machine, in any discovery order,
agrees on the split without talking to the others. A pair is hashed by its two names sorted
and flattened as its store group names them, so ``a b`` and ``b a`` (which match-pairs treats
as one pair) fall in the same shard. Shard K of N of ``--out OUT`` is the store
``OUT.shards/K-of-N.h5`` (K zero-padded to the width of N), a normal store in every respect.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .names import flat_name

SHARD_NAME = re.compile(r"(\d+)-of-(\d+)\.h5")


def bucket(key: str, count: int) -> int:
    """``key``'s bucket among ``count`` (0-based): its BLAKE2b hash modulo ``count``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def image_shard(name: str, count: int) -> int:
    """The shard (1 .. ``count``) of image ``name``."""
    return bucket(name, count) + 1


def pair_shard(name0: str, name1: str, count: int) -> int:
    """The shard (1 .. ``count``) of a pair, the same in either order."""
    return bucket("\n".join(sorted((flat_name(name0), flat_name(name1)))), count) + 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ConfigError(f"--shard {self.index}/{self.count}: needs 1 <= K <= N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds_image(self, name: str) -> bool:
        """Whether image ``name`` (as stored) is in this shard."""
        return image_shard(name, self.count) == self.index

    def holds_pair(self, name0: str, name1: str) -> bool:
        """Whether the pair is in this shard, in either order."""
        return pair_shard(name0, name1, self.count) == self.index

    def store(self, out: Path) -> Path:
        """This shard's store for ``--out OUT``: ``OUT.shards/K-of-N.h5``."""
        return shard_folder(out) / f"{self.index:0{len(str(self.count))}d}-of-{self.count}.h5"


def shard_folder(out: Path) -> Path:
    """The folder of ``OUT``'s shard stores: ``OUT.shards`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_of_store(path: Path) -> Shard | None:
    """The shard a store's file name says it holds (``K-of-N.h5``), None for another name."""
    found = SHARD_NAME.fullmatch(Path(path).name)
    if not found or not 1 <= int(found[1]) <= int(found[2]):
        return None
    return Shard(int(found[1]), int(found[2]))


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--shard auto: {name}={value!r} is not a number") from None


def parse_shard(spec: str, shards: int | None = None, env: Mapping[str, str] | None = None) -> Shard:
    """``--shard K/N``, or ``auto``: the task of a SLURM job array (its place in the array, so
    ``--array=0-15`` and ``--array=1-16`` both give shards 1 .. 16; N is the array's size unless
    ``shards`` says it) or of a Kubernetes Indexed Job (``JOB_COMPLETION_INDEX`` + 1; N from
    ``shards``, the Job's completions)."""
    if spec != "auto":
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not found:
            raise ConfigError(f"--shard {spec}: expected K/N (shard K of N, 1 <= K <= N) or auto")
        if shards is not None and shards != int(found[2]):
            raise ConfigError(f"--shard {spec} and --shards {shards} disagree on the number of shards")
        return Shard(int(found[1]), int(found[2]))
    env = os.environ if env is None else env
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        size = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        if shards is not None and size is not None and shards != size:
            raise ConfigError(f"--shard auto: --shards {shards} but the SLURM array has {size} tasks")
        count = shards or size
        if count is None:
            raise ConfigError("--shard auto: SLURM_ARRAY_TASK_COUNT is not set; pass --shards N")
        if (task - first) % step:
            raise ConfigError(f"--shard auto: SLURM array task {task} is off the array's step {step}")
        index = (task - first) // step + 1
        if index > count:
            raise ConfigError(
                f"--shard auto: SLURM array task {task} is task {index} of an array starting at {first}, "
                f"beyond {count} shards; use a range --array=A-B (step S) of N tasks, or --shards N"
            )
        return Shard(index, count)
    index = _env_int(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        if shards is None:
            raise ConfigError(
                "--shard auto in a Kubernetes Indexed Job needs --shards N (the Job's completions)"
            )
        if not 0 <= index < shards:
            raise ConfigError(f"--shard auto: JOB_COMPLETION_INDEX {index} is not below --shards {shards}")
        return Shard(index + 1, shards)
    raise ConfigError(
        "--shard auto: neither SLURM_ARRAY_TASK_ID (a SLURM job array) nor JOB_COMPLETION_INDEX "
        "(a Kubernetes Indexed Job) is set; pass --shard K/N"
    )


def shard_output(out: Path, shard: Shard) -> Path:
    """``shard``'s store for ``--out OUT``, its folder ``OUT.shards`` created if needed."""
    store = shard.store(out)
    try:
        store.parent.mkdir(exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{store.parent}: cannot create the shards' folder ({error.strerror or error})"
        ) from error
    return store
