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
import json
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError
from .model import LAYER_NAMES, SuperPoint


@dataclass(frozen=True)
class NamedWeights:
    """A published weight file: where to get it and how to recognise it."""

    url: str
    git_blob_sha1: str
    licence: str


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


def download(url: str, destination: Path, expected_sha1: str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``destination`` atomically, refusing content with another git SHA-1."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise WeightsError(
            f"cannot download {url} ({error}); offline? pass a local file with --weights PATH "
            f"or SP_EXTRACT_WEIGHTS=PATH, or put it at {destination}"
        ) from error
    actual = git_blob_sha1(data)
    if actual != expected_sha1:
        raise WeightsError(f"{url}: checksum mismatch (git SHA-1 {actual}, expected {expected_sha1})")
    partial = destination.with_name(f"{destination.name}.{os.getpid()}.part")  # one per process
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, destination)
    except OSError as error:
        raise WeightsError(
            f"{destination}: cannot write the weights cache ({error.strerror or error}); "
            "set SP_EXTRACT_CACHE to a writable folder or pass a file with --weights PATH"
        ) from error
    return destination


def fetch_named(name: str) -> Path:
    """Path of the named weights in the cache, downloading and verifying them on first use."""
    spec = NAMED_WEIGHTS[name]
    filename = spec.url.rsplit("/", 1)[1]
    path = cache_dir() / filename
    if path.exists():
        if git_blob_sha1(path.read_bytes()) == spec.git_blob_sha1:
            return path
        print(f"sp-extract: {path} fails its checksum, downloading it again", file=sys.stderr)
    mirror = os.environ.get("SP_EXTRACT_MIRROR")
    url = f"{mirror.rstrip('/')}/{filename}" if mirror else spec.url
    download(url, path, spec.git_blob_sha1)
    print(f"sp-extract: {name}: {spec.licence}", file=sys.stderr)
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Minimal reader of the safetensors format (8-byte header size, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])
    body = memoryview(raw)[8 + header_size :]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise WeightsError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        tensors[key] = torch.from_numpy(array.copy())  # own, aligned memory; dtype kept
    return tensors


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` / ``.pt`` / ``.bin`` (PyTorch) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}, not a weights file")
    try:
        if path.suffix == ".safetensors":
            state = _read_safetensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
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
    for key in expected:  # a BatchNorm's update counter plays no part in inference
        if key.endswith(".num_batches_tracked"):
            converted.setdefault(key, expected[key])
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise WeightsError(f"{source}: incomplete SuperPoint weights (missing {', '.join(missing[:3])})")
    for key, tensor in converted.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise WeightsError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    return {
        k: v.float() if v.is_floating_point() else v for k, v in converted.items() if k in expected
    }, batch_norm


def load_weights(spec: str | None = None) -> LoadedWeights:
    """Resolve ``spec`` (a name, a path, or None for the default / ``SP_EXTRACT_WEIGHTS``)."""
    spec = spec or os.environ.get("SP_EXTRACT_WEIGHTS") or DEFAULT_WEIGHTS
    if spec in NAMED_WEIGHTS:
        path, label = fetch_named(spec), spec
    else:
        path, label = Path(spec), Path(spec).name
        if not path.exists():
            names = ", ".join(NAMED_WEIGHTS)
            raise WeightsError(f"{spec}: no such weights file, and not a known name ({names})")
    state, batch_norm = convert_state_dict(read_state_dict(path), str(path))
    return LoadedWeights(state, batch_norm, git_blob_sha1(path.read_bytes()), label)
