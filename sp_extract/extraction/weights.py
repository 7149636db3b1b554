"""Weights: resolve a name or path to a SuperPoint state dict in this package's layout.

Named sets are downloaded once into a cache folder (``SP_EXTRACT_CACHE``, else the XDG cache)
and verified against their published git blob SHA-1; ``SP_EXTRACT_WEIGHTS=PATH`` overrides the
choice and ``SP_EXTRACT_MIRROR=URL`` replaces the download location. Files are accepted in
three layouts, told apart by their keys: Magic Leap's (``conv1a.weight`` ...), Rémi Pautrat's
BatchNorm re-training (``backbone.0.0.conv.weight`` ...) and Hugging Face transformers'
``SuperPointForKeypointDetection`` (safetensors or PyTorch ``.bin``).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ..errors import WeightsError
from ..store.atomic import atomic_write
from .model import LAYER_NAMES, SuperPoint


@dataclass(frozen=True)
class NamedWeights:
    """A published weight file: where to get it and how to recognise it (its published SHA-256
    when there is one, else its git blob SHA-1)."""

    url: str
    git_blob_sha1: str | None
    licence: str
    sha256: str | None = None

    def checksum(self, data: bytes) -> tuple[str, str, str | None]:
        """The kind of checksum, its value for ``data`` and the published value."""
        if self.sha256:
            return "SHA-256", hashlib.sha256(data).hexdigest(), self.sha256
        return "git SHA-1", git_blob_sha1(data), self.git_blob_sha1


NAMED_WEIGHTS = {
    "superpoint-v1": NamedWeights(
        "https://github.com/magicleap/SuperPointPretrainedNetwork/raw/master/superpoint_v1.pth",
        "107a444ca318d487390137d619d49f2f0a3b1ad8",
        "Magic Leap SuperPoint v1 weights: non-commercial research use only "
        "(see the LICENSE of magicleap/SuperPointPretrainedNetwork).",
    ),
    "superpoint-v6-mit": NamedWeights(
        "https://github.com/rpautrat/SuperPoint/raw/master/weights/superpoint_v6_from_tf.pth",
        "f645e8db1b10a7be84d4e50d67a3c64dd240a49a",
        "SuperPoint v6 weights by Rémi Pautrat: MIT licence (rpautrat/SuperPoint).",
    ),
}
DEFAULT_WEIGHTS = "superpoint-v1"


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict for ``SuperPoint(batch_norm=...)`` and the identity recorded in stores.

    ``sha1`` (the file's git blob SHA-1) identifies the weights; ``label`` is for people.
    """

    state_dict: dict[str, torch.Tensor]
    batch_norm: bool
    sha1: str
    label: str

    def build(self) -> SuperPoint:
        """An eval-mode network with these weights."""
        model = SuperPoint(batch_norm=self.batch_norm)
        model.load_state_dict(self.state_dict)
        return model.eval()


def cache_dir() -> Path:
    """Where named weights are kept."""
    if os.environ.get("SP_EXTRACT_CACHE"):
        return Path(os.environ["SP_EXTRACT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sp-extract"


def git_blob_sha1(data: bytes) -> str:
    """SHA-1 of ``data`` as git hashes a file (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


WEIGHTS_HINT = "--weights PATH or SP_EXTRACT_WEIGHTS=PATH"


def download(
    url: str, destination: Path, spec: NamedWeights, hint: str = WEIGHTS_HINT, timeout: float = 60.0
) -> Path:
    """Fetch ``url`` to ``destination`` atomically, refusing content with another checksum than
    ``spec``'s; ``hint`` says how to pass a local file instead."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise WeightsError(
            f"cannot download {url} ({error}); offline? pass a local file with {hint}, "
            f"or put it at {destination}"
        ) from error
    kind, actual, expected = spec.checksum(data)
    if actual != expected:
        raise WeightsError(f"{url}: checksum mismatch ({kind} {actual}, expected {expected})")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(destination, durable=False) as partial:  # one temporary per process
            partial.write_bytes(data)
    except OSError as error:
        raise WeightsError(
            f"{destination}: cannot write the weights cache ({error.strerror or error}); "
            f"set SP_EXTRACT_CACHE to a writable folder or pass a file with {hint}"
        ) from error
    return destination


def fetch_named(name: str, table: dict[str, NamedWeights] | None = None, hint: str = WEIGHTS_HINT) -> Path:
    """Path of the named weights (of ``table``, else SuperPoint's) in the cache, downloading and
    verifying them on first use; the licence is printed when they are downloaded."""
    spec = (NAMED_WEIGHTS if table is None else table)[name]
    filename = spec.url.rsplit("/", 1)[1]
    path = cache_dir() / filename
    if path.exists():
        _, actual, expected = spec.checksum(path.read_bytes())
        if actual == expected:
            return path
        print(f"sp-extract: {path} fails its checksum, downloading it again", file=sys.stderr)
    mirror = os.environ.get("SP_EXTRACT_MIRROR")
    url = f"{mirror.rstrip('/')}/{filename}" if mirror else spec.url
    download(url, path, spec, hint)
    print(f"sp-extract: {name}: {spec.licence}", file=sys.stderr)
    return path


def resolve(spec: str, table: dict[str, NamedWeights], hint: str, what: str) -> tuple[Path, str]:
    """The file of ``spec``, a name of ``table`` (fetched) or a path, and its label."""
    if spec in table:
        return fetch_named(spec, table, hint), spec
    path = Path(spec)
    if not path.exists():
        raise WeightsError(f"{spec}: no such {what} file, and not a known name ({', '.join(table)})")
    return path, path.name


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` / ``.pt`` / ``.bin`` (PyTorch) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}, not a weights file")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure of an arbitrary file
        raise WeightsError(  # one line: torch's own messages run over many
            f"{path}: not a readable weights file, expected a PyTorch state dict (.pth, .pt, .bin) "
            f"or a .safetensors file ({type(error).__name__})"
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


_V6_BACKBONE = re.compile(r"backbone\.(\d)\.(\d)\.(conv|bn)\.(.+)")
_V6_HEAD = re.compile(r"(detector|descriptor)\.(\d)\.(conv|bn)\.(.+)")
_HF_ENCODER = re.compile(r"encoder\.conv_blocks\.(\d)\.conv_(a|b)\.(.+)")
_HF_HEAD = re.compile(r"(keypoint_decoder\.conv_score|descriptor_decoder\.conv_descriptor)_(a|b)\.(.+)")


def _rename_v6(key: str) -> str | None:
    if match := _V6_BACKBONE.fullmatch(key):
        block, layer, kind, param = match.groups()
        return f"{kind}{int(block) + 1}{'ab'[int(layer)]}.{param}"
    if match := _V6_HEAD.fullmatch(key):
        head, layer, kind, param = match.groups()
        return f"{kind}{'P' if head == 'detector' else 'D'}{'ab'[int(layer)]}.{param}"
    return None


def _rename_hf(key: str) -> str | None:
    key = key.removeprefix("superpoint.")
    if match := _HF_ENCODER.fullmatch(key):
        block, layer, param = match.groups()
        return f"conv{int(block) + 1}{layer}.{param}"
    if match := _HF_HEAD.fullmatch(key):
        head, layer, param = match.groups()
        return f"conv{'P' if head.startswith('keypoint') else 'D'}{layer}.{param}"
    return None


def convert_state_dict(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename a state dict of any supported layout to ours; returns it and ``batch_norm``."""
    keys = set(state)
    v1_keys = {f"conv{name}.{p}" for name in LAYER_NAMES for p in ("weight", "bias")}
    if v1_keys <= keys:
        converted = {k: v for k, v in state.items() if k in v1_keys or k.startswith("bn")}
    elif any(k.startswith("backbone.") for k in keys):
        converted = {new: v for k, v in state.items() if (new := _rename_v6(k))}
    elif any("conv_blocks" in k for k in keys):
        converted = {new: v for k, v in state.items() if (new := _rename_hf(k))}
    else:
        sample = ", ".join(sorted(keys)[:3]) or "none"
        raise WeightsError(f"{source}: not SuperPoint weights (unrecognised keys such as {sample})")
    batch_norm = any(k.startswith("bn") for k in converted)
    expected = SuperPoint(batch_norm=batch_norm).state_dict()
    return checked_state_dict(converted, expected, source, "SuperPoint"), batch_norm


def checked_state_dict(
    converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, network: str
) -> dict[str, torch.Tensor]:
    """The entries of ``converted`` that ``expected`` (a network's state dict) has, in float32;
    refuses missing entries and other shapes."""
    for key in expected:  # a BatchNorm's update counter plays no part in inference
        if key.endswith(".num_batches_tracked"):
            converted.setdefault(key, expected[key])
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise WeightsError(f"{source}: incomplete {network} weights (missing {', '.join(missing[:3])})")
    for key, tensor in converted.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise WeightsError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    return {k: v.float() if v.is_floating_point() else v for k, v in converted.items() if k in expected}


def load_weights(spec: str | None = None) -> LoadedWeights:
    """Resolve ``spec`` (a name, a path, or None for the default / ``SP_EXTRACT_WEIGHTS``)."""
    spec = spec or os.environ.get("SP_EXTRACT_WEIGHTS") or DEFAULT_WEIGHTS
    path, label = resolve(spec, NAMED_WEIGHTS, WEIGHTS_HINT, "weights")
    state, batch_norm = convert_state_dict(read_state_dict(path), str(path))
    return LoadedWeights(state, batch_norm, git_blob_sha1(path.read_bytes()), label)
