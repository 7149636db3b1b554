"""Learned matchers' weights: resolve a name or path to a SuperGlue or LightGlue network.

Named sets are downloaded, cached, verified and overridden by ``SP_EXTRACT_MIRROR`` exactly as
SuperPoint's (``extraction.weights``), each licence printed when its file is downloaded. Files
are accepted in the original projects' layouts (Magic Leap's SuperGluePretrainedNetwork,
cvg/LightGlue) and in Hugging Face transformers' (``SuperGlueForKeypointMatching``,
``LightGlueForKeypointMatching``, safetensors or ``.bin``; the SuperPoint keys such a checkpoint
also holds are ignored), told apart by their keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import WeightsError
from ..extraction.weights import NamedWeights, checked_state_dict, git_blob_sha1, read_state_dict, resolve
from .lightglue import LightGlue
from .superglue import SuperGlue

_SUPERGLUE_LICENCE = (
    "Magic Leap SuperGlue weights: non-commercial research use only "
    "(see the LICENSE of magicleap/SuperGluePretrainedNetwork)."
)
_SUPERGLUE_URL = "https://github.com/magicleap/SuperGluePretrainedNetwork/raw/master/models/weights"
MATCHER_WEIGHTS = {
    "superglue-outdoor": NamedWeights(
        f"{_SUPERGLUE_URL}/superglue_outdoor.pth",
        "5ca3392bd5349790d7bc1c246961fc041b88c1e8",
        _SUPERGLUE_LICENCE,
    ),
    "superglue-indoor": NamedWeights(
        f"{_SUPERGLUE_URL}/superglue_indoor.pth",
        "2b54532f1b7321505cac79ee3a2863ef2ab2d163",
        _SUPERGLUE_LICENCE,
    ),
    "lightglue-superpoint": NamedWeights(
        "https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/superpoint_lightglue.pth",
        None,
        "LightGlue weights for SuperPoint by ETH Zurich CVG: Apache-2.0 licence (cvg/LightGlue).",
        sha256="6ff7040d0a497fc6639337946d7538dae07428c18f77a067a0b5a960e7cc551a",
    ),
}
DEFAULT_MATCHER_WEIGHTS = {"superglue": "superglue-outdoor", "lightglue": "lightglue-superpoint"}
HEADS = 4  # both published networks: 256-d descriptors, 4 attention heads


@dataclass(frozen=True)
class MatcherWeights:
    """A state dict in this package's layout for ``matcher`` and the identity recorded in stores:
    ``sha1``, the file's git blob SHA-1, and ``label``, for people."""

    matcher: str
    state_dict: dict[str, torch.Tensor]
    sha1: str
    label: str

    @property
    def layers(self) -> int:
        """The network's depth (attention layers; the published sets have 18 and 9)."""
        prefix = "layers." if self.matcher == "superglue" else "transformer_layers."
        indices = (int(k[len(prefix) :].split(".")[0]) for k in self.state_dict if k.startswith(prefix))
        return 1 + max(indices, default=0)


def _interleaved_heads(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Magic Leap's attention orders channels as (head dim, heads); ours as (heads, head dim).
    Reorders ``weight``'s ``dim`` (0: rows of a projection or a bias, 1: columns of the merge)."""
    moved = weight.movedim(dim, 0)
    moved = moved.unflatten(0, (-1, HEADS)).transpose(0, 1).flatten(0, 1)
    return moved.movedim(0, dim).contiguous()


def _magicleap_perceptron(prefix: str, keys: set[str], index: int, param: str, ours: str) -> str:
    """Name of entry ``index`` of an original ``nn.Sequential`` (conv, BN, ReLU, ..., conv)."""
    block, kind = divmod(index, 3)
    if kind == 1:
        return f"{ours}.{block}.batch_norm.{param}"
    followed_by_norm = f"{prefix}.{index + 1}.weight" in keys
    return f"{ours}.{block}.linear.{param}" if followed_by_norm else f"{ours}.{block}.{param}"


_ML_KENC = re.compile(r"kenc\.encoder\.(\d+)\.(\w+)")
_ML_ATTENTION = re.compile(r"gnn\.layers\.(\d+)\.attn\.(proj\.\d|merge)\.(\w+)")
_ML_MLP = re.compile(r"gnn\.layers\.(\d+)\.mlp\.(\d+)\.(\w+)")


def _from_magicleap_superglue(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys, out = set(state), {}
    for key, tensor in state.items():
        if tensor.dim() == 3:  # Conv1d (out, in, 1) -> Linear (out, in)
            tensor = tensor[..., 0]
        if match := _ML_KENC.fullmatch(key):
            index, param = int(match[1]), match[2]
            out[_magicleap_perceptron("kenc.encoder", keys, index, param, "keypoint_encoder")] = tensor
        elif match := _ML_ATTENTION.fullmatch(key):
            layer, part, param = match.groups()
            if part == "merge":
                name = "merge"
                tensor = _interleaved_heads(tensor, 1) if param == "weight" else tensor
            else:
                name = ("query", "key", "value")[int(part[-1])]
                tensor = _interleaved_heads(tensor, 0)
            out[f"layers.{layer}.attention.{name}.{param}"] = tensor
        elif match := _ML_MLP.fullmatch(key):
            layer, index, param = match[1], int(match[2]), match[3]
            out[
                _magicleap_perceptron(f"gnn.layers.{layer}.mlp", keys, index, param, f"layers.{layer}.mlp")
            ] = tensor
        elif key.startswith(("final_proj.", "bin_score")):
            out[key] = tensor
    return out


_HF_SUPERGLUE_NAMES = [
    ("keypoint_encoder.encoder.", "keypoint_encoder."),
    ("gnn.layers.", "layers."),
    (".attention.self.", ".attention."),
    (".attention.output.dense.", ".attention.merge."),
    ("final_projection.final_proj.", "final_proj."),
]


def _from_hf_superglue(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        for old, new in _HF_SUPERGLUE_NAMES:
            key = key.replace(old, new)
        out[key] = tensor
    return out


_CVG_LAYER = re.compile(r"transformers\.(\d+)\.(self_attn|cross_attn)\.(\w+)\.(?:(\d)\.)?(\w+)")
_CVG_MLP = {"0": "fc1", "1": "layer_norm", "3": "fc2"}
_CVG_OTHER = [
    ("posenc.Wr.", "positional_encoder.projector."),
    ("log_assignment.", "match_assignment_layers."),
    (".final_proj.", ".final_projection."),
    (".token.0.", ".token."),
]


def _from_cvg_lightglue(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        key = re.sub(r"^(self_attn|cross_attn)\.(\d+)\.", r"transformers.\2.\1.", key)  # v0.1 names
        if match := _CVG_LAYER.fullmatch(key):
            layer, block, part, index, param = match.groups()
            prefix = f"transformer_layers.{layer}.{'self' if block == 'self_attn' else 'cross'}"
            if part == "ffn":
                out[f"{prefix}_mlp.{_CVG_MLP[index]}.{param}"] = tensor
            elif part == "Wqkv":  # rows ordered (heads, head dim, q/k/v)
                for which, name in enumerate("qkv"):
                    part_tensor = tensor.unflatten(0, (HEADS, -1, 3))[:, :, which].flatten(0, 1)
                    out[f"{prefix}_attention.{name}_proj.{param}"] = part_tensor.contiguous()
            elif part == "to_qk":  # one projection for queries and keys
                out[f"{prefix}_attention.q_proj.{param}"] = tensor
                out[f"{prefix}_attention.k_proj.{param}"] = tensor
            else:
                name = {"to_v": "v_proj", "to_out": "o_proj", "out_proj": "o_proj"}[part]
                out[f"{prefix}_attention.{name}.{param}"] = tensor
            continue
        for old, new in _CVG_OTHER:
            key = key.replace(old, new)
        out[key] = tensor
    return out


def convert_matcher_state(state: dict[str, torch.Tensor], source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The matcher (``superglue`` or ``lightglue``) a state dict of any supported layout is for,
    and the state dict renamed to this package's layout (complete and of the right shapes, for
    a network as deep as the file's)."""
    state = {
        re.sub(r"^(superglue|lightglue)\.", "", k): v
        for k, v in state.items()
        if "keypoint_detector." not in k
    }
    keys = set(state)
    if any(k.startswith("kenc.") for k in keys):
        matcher, converted = "superglue", _from_magicleap_superglue(state)
    elif any(k.startswith("gnn.layers.") for k in keys):
        matcher, converted = "superglue", _from_hf_superglue(state)
    elif any(k.startswith("layers.") for k in keys):  # this package's own (a saved ``SuperGlue``)
        matcher, converted = "superglue", state
    elif any(k.startswith("transformer_layers.") for k in keys):
        matcher, converted = "lightglue", state
    elif any(k.startswith(("transformers.", "self_attn.", "posenc.")) for k in keys):
        matcher, converted = "lightglue", _from_cvg_lightglue(state)
    else:
        sample = ", ".join(sorted(keys)[:3]) or "none"
        raise WeightsError(
            f"{source}: not SuperGlue or LightGlue weights (unrecognised keys such as {sample})"
        )
    layers = MatcherWeights(matcher, converted, "", "").layers
    expected = (SuperGlue(layers=layers) if matcher == "superglue" else LightGlue(layers=layers)).state_dict()
    return matcher, checked_state_dict(converted, expected, source, matcher)


def load_matcher_weights(matcher: str, spec: str | None = None) -> MatcherWeights:
    """Resolve ``spec`` (a name, a path, or None for the matcher's default name)."""
    spec = spec or DEFAULT_MATCHER_WEIGHTS[matcher]
    path, label = resolve(spec, MATCHER_WEIGHTS, "--matcher-weights PATH", "matcher weights")
    found, state = convert_matcher_state(read_state_dict(path), str(path))
    if found != matcher:
        raise WeightsError(f"{path}: {found} weights, not {matcher} (use --matcher {found})")
    return MatcherWeights(matcher, state, git_blob_sha1(path.read_bytes()), label)


def build_matcher(weights: MatcherWeights, options: dict[str, float]) -> nn.Module:
    """An eval-mode SuperGlue or LightGlue with ``weights`` and ``options`` (its keyword arguments)."""
    network = SuperGlue if weights.matcher == "superglue" else LightGlue
    model = network(layers=weights.layers, **options)
    model.load_state_dict(weights.state_dict)
    return model.eval()
