"""Learned matchers: SuperGlue and LightGlue equal to Hugging Face transformers' implementations.

The transformers models are built with their own random initialisation (fixed seed, thresholds
at 0: random weights give tiny scores, and fewer layers than the published networks to keep the
tests fast), saved with ``save_pretrained`` and loaded by ``match-pairs`` through
``--matcher-weights``. The original projects' key layouts are written here from those weights
by hand. LightGlue's adaptive depth and width are steered (token-confidence and matchability
weights along chosen descriptor directions) so that pairs stop early and keypoints are pruned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli
from test_weights import WeightsServer
from transformers import (
    LightGlueConfig,
    LightGlueForKeypointMatching,
    SuperGlueConfig,
    SuperGlueForKeypointMatching,
)

from sp_extract.errors import ConfigError, WeightsError
from sp_extract.matching import weights as matcher_weights
from sp_extract.matching.config import MatchConfig, MatchRun
from sp_extract.matching.learned import match_batch
from sp_extract.matching.run import match_pairs
from sp_extract.matching.weights import build_matcher, load_matcher_weights
from sp_extract.names import pair_key
from sp_extract.store.writer import StoreWriter

WIDTH, HEIGHT = 640, 480
SINKHORN = 10
STOP, PRUNE = 0, 1  # descriptor directions steering LightGlue's early stop and pruning
UPDATE_SCALE, SIMILARITY_SCALE, POSITION_SCALE = 0.1, 100.0, 30.0


@dataclasses.dataclass
class Reference:
    """A transformers model and the folder it was saved to."""

    model: torch.nn.Module
    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / "model.safetensors"


@pytest.fixture(scope="module")
def superglue(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    torch.manual_seed(0)
    config = SuperGlueConfig(
        gnn_layers_types=["self", "cross"], sinkhorn_iterations=SINKHORN, matching_threshold=0.0
    )
    model = SuperGlueForKeypointMatching(config).eval()
    with torch.no_grad():  # positions count (unit-gain encoder), a peaked similarity
        for layer in model.keypoint_encoder.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, (2.0 / layer.in_features) ** 0.5)
        model.keypoint_encoder.encoder[-1].weight *= 0.01
        model.final_projection.final_proj.weight.normal_(0.0, 2.0)
        model.final_projection.final_proj.weight[:, [STOP, PRUNE]] = 0.0  # LightGlue's steering
    folder = tmp_path_factory.mktemp("superglue")
    model.save_pretrained(folder)
    return Reference(model, folder)


def steered_lightglue() -> torch.nn.Module:
    """transformers' LightGlue of 3 layers, random (seed 0) but for: after layer 0, confident
    keypoints along PRUNE are unmatchable (pruned); after layer 1, a pair whose keypoints point
    along STOP is confident (stops); updates are scaled down so the directions survive, the
    similarity, scaled up above the matchability, ignores them, and positions count (larger
    positional frequencies and self-attention queries and keys)."""
    torch.manual_seed(0)
    model = LightGlueForKeypointMatching(LightGlueConfig(num_hidden_layers=3, filter_threshold=0.0)).eval()
    with torch.no_grad():
        for layer in model.transformer_layers:
            layer.self_mlp.fc2.weight *= UPDATE_SCALE
            layer.cross_mlp.fc2.weight *= UPDATE_SCALE
        for confidence in model.token_confidence:
            confidence.token.weight.zero_()
        model.token_confidence[0].token.weight[0, PRUNE] = 20.0
        model.match_assignment_layers[0].matchability.weight[0, PRUNE] = -20.0
        model.token_confidence[1].token.weight[0, STOP] = 20.0
        model.positional_encoder.projector.weight *= POSITION_SCALE
        for layer in model.transformer_layers:
            layer.self_attention.q_proj.weight *= POSITION_SCALE
            layer.self_attention.k_proj.weight *= POSITION_SCALE
        for assignment in model.match_assignment_layers:  # matches depend on the other directions
            assignment.final_projection.weight *= SIMILARITY_SCALE
            assignment.final_projection.weight[:, [STOP, PRUNE]] = 0.0
    return model


@pytest.fixture(scope="module")
def lightglue(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    model = steered_lightglue()
    folder = tmp_path_factory.mktemp("lightglue")
    model.save_pretrained(folder)
    return Reference(model, folder)


def matcher_options(matcher: str) -> dict[str, float]:
    """Thresholds at 0 (random weights give tiny scores); LightGlue's adaptive options at their defaults."""
    if matcher == "superglue":
        return {"sinkhorn_iterations": SINKHORN, "match_threshold": 0.0}
    return {"filter_threshold": 0.0}


def random_image(rng: np.random.Generator, n: int, stop: bool = False, size=(WIDTH, HEIGHT)) -> dict:
    """Keypoints in the image, scores, unit descriptors; half the keypoints lean along PRUNE,
    all along STOP if ``stop``."""
    descriptors = rng.standard_normal((n, 256))
    descriptors[: n // 2, PRUNE] += 8.0
    descriptors[:, STOP] += 5.0 if stop else -5.0
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return {
        "keypoints": (rng.random((n, 2)) * np.array(size)).astype(np.float32),
        "scores": rng.random(n).astype(np.float32),
        "descriptors": descriptors.astype(np.float32),
        "image_size": np.array(size, dtype=np.int64),
    }


def as_tensors(image: dict) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(image[k]) for k in ("keypoints", "scores", "descriptors", "image_size"))


def write_features(path: Path, images: dict[str, dict]) -> Path:
    """A feature store in hloc's layout (descriptors stored D x N)."""
    with StoreWriter(path, "features", {"weights_sha1": "test"}) as writer:
        for name, image in images.items():
            writer.add(name, {**image, "descriptors": image["descriptors"].T.copy()})
    return path


def transformers_matches(reference: Reference, image0: dict, image1: dict) -> tuple[np.ndarray, ...]:
    """transformers' matching of one pair of images of the same size and keypoint count."""
    stacked = {k: torch.from_numpy(np.stack([image0[k], image1[k]]))[None] for k in image0}
    mask = torch.ones(stacked["scores"].shape, dtype=torch.bool)
    args = [stacked["keypoints"], stacked["descriptors"]]
    if isinstance(reference.model, SuperGlueForKeypointMatching):
        args.append(stacked["scores"])
    with torch.no_grad():
        output = reference.model._match_image_pair(*args, HEIGHT, WIDTH, mask=mask)
    matches, scores = output[0].reshape(2, -1)[0], output[1].reshape(2, -1)[0]
    pruned = output[2].reshape(2, -1) if len(output) == 5 else None  # LightGlue: layers each keypoint ran
    return matches.numpy(), scores.numpy(), pruned


def match_set(matches: np.ndarray) -> set[tuple[int, int]]:
    return {(i, int(j)) for i, j in enumerate(matches) if j >= 0}


def assert_equal_matches(found: list[tuple[np.ndarray, np.ndarray]], expected: list[tuple[np.ndarray, ...]]):
    """Jaccard >= 0.999 over all pairs' matches; common matches' scores equal in float16."""
    ours = {(p, m) for p, (matches, _) in enumerate(found) for m in match_set(matches)}
    theirs = {(p, m) for p, (matches, *_) in enumerate(expected) for m in match_set(matches)}
    assert len(theirs) > 100
    assert len(ours & theirs) / len(ours | theirs) >= 0.999
    for (matches, scores), (ref_matches, ref_scores, *_) in zip(found, expected):
        same = (matches == ref_matches) & (matches >= 0)
        ours16, theirs16 = scores[same].astype(np.float16), ref_scores[same].astype(np.float16)
        assert np.all(np.abs(ours16.astype(np.float32) - theirs16.astype(np.float32)) <= np.spacing(theirs16))


def run_match_pairs(
    tmp_path: Path, images: dict[str, dict], pairs: list[tuple[str, str]], config: MatchConfig
):
    features = write_features(tmp_path / "feats.h5", images)
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    out = tmp_path / "matches.h5"
    summary = match_pairs(pairs_file, features, out, config, MatchRun(device="cpu"))
    assert summary.done == len(pairs) and not summary.failed
    with h5py.File(out, "r") as h5:
        stored = [(h5[pair_key(*p)]["matches0"][()], h5[pair_key(*p)]["matching_scores0"][()]) for p in pairs]
        settings = json.loads(h5.attrs["sp_extract_settings"])
    for matches, scores in stored:
        assert matches.dtype == np.int32 and scores.dtype == np.float16
    return stored, settings


@pytest.mark.parametrize("matcher", ["superglue", "lightglue"])
def test_match_pairs_equals_transformers(tmp_path: Path, request, matcher: str) -> None:
    reference: Reference = request.getfixturevalue(matcher)
    rng = np.random.default_rng(7)
    images, pairs = {}, []
    for n, stop in ((512, True), (1024, False), (2048, True)):
        images[f"{n}/a.jpg"], images[f"{n}/b.jpg"] = random_image(rng, n, stop), random_image(rng, n, stop)
        pairs.append((f"{n}/a.jpg", f"{n}/b.jpg"))
    config = MatchConfig(
        matcher=matcher, matcher_weights=str(reference.checkpoint), **matcher_options(matcher)
    )
    stored, settings = run_match_pairs(tmp_path, images, pairs, config)
    expected = [transformers_matches(reference, images[a], images[b]) for a, b in pairs]
    assert_equal_matches(stored, expected)
    assert settings["matcher"] == matcher and settings["matcher_weights"] == "model.safetensors"
    assert len(settings["matcher_weights_sha1"]) == 40 and "ratio" not in settings
    if matcher == "lightglue":  # the adaptive paths ran: pruned keypoints, early and late stops
        layers_run = [pruned for *_, pruned in expected]
        assert all((layers == 1).any() for layers in layers_run)
        assert layers_run[0].max() == 2 and layers_run[1].max() == 3


@pytest.mark.parametrize("matcher", ["superglue", "lightglue"])
def test_padded_batches_equal_single_pairs(request, matcher: str) -> None:
    reference: Reference = request.getfixturevalue(matcher)
    weights = load_matcher_weights(matcher, str(reference.checkpoint))
    model = build_matcher(weights, matcher_options(matcher))
    rng = np.random.default_rng(3)
    sizes = [
        (200, 260, True),
        (256, 100, False),
        (0, 50, True),
        (90, 0, False),
        (64, 64, False),
        (220, 220, True),
    ]
    pairs = [
        (
            as_tensors(random_image(rng, n0, stop, (800, 600))),
            as_tensors(random_image(rng, n1, stop, (500, 900))),
        )
        for n0, n1, stop in sizes
    ]
    batched = match_batch(model, [a for a, _ in pairs], [b for _, b in pairs])
    total = 0
    for row, (a, b) in enumerate(pairs):
        matches, scores = match_batch(model, [a], [b])
        np.testing.assert_array_equal(batched[0][row, : len(a[0])], matches[0, : len(a[0])])
        torch.testing.assert_close(batched[1][row, : len(a[0])], scores[0, : len(a[0])], rtol=1e-4, atol=1e-9)
        total += int((matches >= 0).sum())
    assert (batched[0][2:4] == -1).all() and total > 100


@pytest.mark.parametrize("matcher", ["superglue", "lightglue"])
def test_each_image_is_normalised_by_its_own_size(request, matcher: str) -> None:
    """Scaling one image's keypoints and size together changes nothing (the original projects'
    normalisation); normalising both images by one size would."""
    reference: Reference = request.getfixturevalue(matcher)
    model = build_matcher(load_matcher_weights(matcher, str(reference.checkpoint)), matcher_options(matcher))
    rng = np.random.default_rng(5)
    image0, image1 = as_tensors(random_image(rng, 200, True)), as_tensors(random_image(rng, 240, True))
    scaled = (image1[0] * 3, image1[1], image1[2], image1[3] * 3)
    matches, scores = match_batch(model, [image0], [image1])
    assert (matches >= 0).sum() > 20
    same_matches, same_scores = match_batch(model, [image0], [scaled])
    assert torch.equal(same_matches, matches)
    torch.testing.assert_close(same_scores, scores, rtol=1e-4, atol=1e-9)
    other_scores = match_batch(model, [image0], [(scaled[0], *image1[1:])])[1]
    assert (other_scores - scores).abs().max() > 1e-3


def conv(weight: torch.Tensor) -> torch.Tensor:
    return weight[..., None] if weight.dim() == 2 else weight


def to_magicleap(hf: dict[str, torch.Tensor], layers: int, heads: int = 4) -> dict[str, torch.Tensor]:
    """transformers' SuperGlue keys -> Magic Leap's (Conv1d, heads interleaved as (head dim, heads))."""
    out = {"bin_score": hf["bin_score"]}
    for param in ("weight", "bias"):
        out[f"final_proj.{param}"] = conv(hf[f"final_projection.final_proj.{param}"])
        out[f"kenc.encoder.12.{param}"] = conv(hf[f"keypoint_encoder.encoder.4.{param}"])
    bn = ("weight", "bias", "running_mean", "running_var")
    for block in range(4):
        out[f"kenc.encoder.{3 * block}.weight"] = conv(hf[f"keypoint_encoder.encoder.{block}.linear.weight"])
        out[f"kenc.encoder.{3 * block}.bias"] = hf[f"keypoint_encoder.encoder.{block}.linear.bias"]
        for param in bn:
            out[f"kenc.encoder.{3 * block + 1}.{param}"] = hf[
                f"keypoint_encoder.encoder.{block}.batch_norm.{param}"
            ]
    for layer in range(layers):
        old, new = f"gnn.layers.{layer}", f"gnn.layers.{layer}"
        for index, name in enumerate(("query", "key", "value")):
            weight, bias = hf[f"{old}.attention.self.{name}.weight"], hf[f"{old}.attention.self.{name}.bias"]
            out[f"{new}.attn.proj.{index}.weight"] = conv(
                weight.view(heads, -1, 256).transpose(0, 1).reshape(256, 256)
            )
            out[f"{new}.attn.proj.{index}.bias"] = bias.view(heads, -1).T.reshape(256)
        merge = hf[f"{old}.attention.output.dense.weight"]
        out[f"{new}.attn.merge.weight"] = conv(merge.view(256, heads, -1).transpose(1, 2).reshape(256, 256))
        out[f"{new}.attn.merge.bias"] = hf[f"{old}.attention.output.dense.bias"]
        for param in ("weight", "bias"):
            out[f"{new}.mlp.0.{param}"] = conv(hf[f"{old}.mlp.0.linear.{param}"])
            out[f"{new}.mlp.3.{param}"] = conv(hf[f"{old}.mlp.1.{param}"])
        for param in bn:
            out[f"{new}.mlp.1.{param}"] = hf[f"{old}.mlp.0.batch_norm.{param}"]
    return out


def to_cvg(hf: dict[str, torch.Tensor], layers: int, heads: int = 4) -> dict[str, torch.Tensor]:
    """transformers' LightGlue keys -> cvg/LightGlue v0.1 (``self_attn.N``: fused Wqkv, rows
    ordered (heads, head dim, q/k/v); cross attention with one query/key projection)."""
    out = {"posenc.Wr.weight": hf["positional_encoder.projector.weight"]}
    for layer in range(layers):
        old = f"transformer_layers.{layer}"
        for param in ("weight", "bias"):
            qkv = [hf[f"{old}.self_attention.{p}_proj.{param}"].unflatten(0, (heads, -1)) for p in "qkv"]
            out[f"self_attn.{layer}.Wqkv.{param}"] = torch.stack(qkv, 2).flatten(0, 2)
            out[f"self_attn.{layer}.out_proj.{param}"] = hf[f"{old}.self_attention.o_proj.{param}"]
            out[f"cross_attn.{layer}.to_qk.{param}"] = hf[f"{old}.cross_attention.q_proj.{param}"]
            out[f"cross_attn.{layer}.to_v.{param}"] = hf[f"{old}.cross_attention.v_proj.{param}"]
            out[f"cross_attn.{layer}.to_out.{param}"] = hf[f"{old}.cross_attention.o_proj.{param}"]
            for block, mlp in (("self_attn", "self_mlp"), ("cross_attn", "cross_mlp")):
                for index, name in (("0", "fc1"), ("1", "layer_norm"), ("3", "fc2")):
                    out[f"{block}.{layer}.ffn.{index}.{param}"] = hf[f"{old}.{mlp}.{name}.{param}"]
            out[f"log_assignment.{layer}.final_proj.{param}"] = hf[
                f"match_assignment_layers.{layer}.final_projection.{param}"
            ]
            out[f"log_assignment.{layer}.matchability.{param}"] = hf[
                f"match_assignment_layers.{layer}.matchability.{param}"
            ]
            if layer < layers - 1:
                out[f"token_confidence.{layer}.token.0.{param}"] = hf[
                    f"token_confidence.{layer}.token.{param}"
                ]
    return out


def test_original_layouts_convert(tmp_path: Path, superglue: Reference, lightglue: Reference) -> None:
    hf_superglue = load_matcher_weights("superglue", str(superglue.checkpoint))
    state = {k: v for k, v in superglue.model.state_dict().items() if not k.startswith("keypoint_detector")}
    torch.save(to_magicleap(state, 2), tmp_path / "superglue_outdoor.pth")
    magicleap = load_matcher_weights("superglue", str(tmp_path / "superglue_outdoor.pth"))
    assert magicleap.state_dict.keys() == hf_superglue.state_dict.keys()
    for key, tensor in hf_superglue.state_dict.items():
        torch.testing.assert_close(magicleap.state_dict[key], tensor, rtol=0, atol=0, msg=key)

    state = {k: v for k, v in lightglue.model.state_dict().items() if not k.startswith("keypoint_detector")}
    for layer in range(3):  # cvg's cross attention has one projection for queries and keys
        state[f"transformer_layers.{layer}.cross_attention.k_proj.weight"] = state[
            f"transformer_layers.{layer}.cross_attention.q_proj.weight"
        ]
        state[f"transformer_layers.{layer}.cross_attention.k_proj.bias"] = state[
            f"transformer_layers.{layer}.cross_attention.q_proj.bias"
        ]
    torch.save(to_cvg(state, 3), tmp_path / "superpoint_lightglue.pth")
    cvg = load_matcher_weights("lightglue", str(tmp_path / "superpoint_lightglue.pth"))
    assert cvg.state_dict.keys() == state.keys() - {k for k in state if k.endswith("num_batches_tracked")}
    for key, tensor in state.items():
        torch.testing.assert_close(cvg.state_dict[key], tensor, rtol=0, atol=0, msg=key)

    with pytest.raises(WeightsError, match="superglue weights, not lightglue"):
        load_matcher_weights("lightglue", str(superglue.checkpoint))
    torch.save({"conv1a.weight": torch.zeros(1)}, tmp_path / "superpoint.pth")
    with pytest.raises(WeightsError, match="not SuperGlue or LightGlue weights"):
        load_matcher_weights("superglue", str(tmp_path / "superpoint.pth"))
    del state["transformer_layers.1.self_mlp.fc2.bias"]
    torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(WeightsError, match="missing transformer_layers.1.self_mlp.fc2.bias"):
        load_matcher_weights("lightglue", str(tmp_path / "incomplete.pth"))


def test_named_weights_download_once_and_verify(
    tmp_path: Path, monkeypatch, capsys, lightglue: Reference
) -> None:
    (tmp_path / "served" / "mirror").mkdir(parents=True)
    server = WeightsServer(tmp_path / "served")
    try:
        for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("SP_EXTRACT_MIRROR", server.url)
        monkeypatch.setenv("SP_EXTRACT_CACHE", str(tmp_path / "cache"))
        served = server.root / "mirror" / "superpoint_lightglue.pth"
        torch.save(lightglue.model.state_dict(), served)  # any layout is accepted under the name

        spec = matcher_weights.MATCHER_WEIGHTS["lightglue-superpoint"]
        monkeypatch.setitem(
            matcher_weights.MATCHER_WEIGHTS,
            "lightglue-superpoint",
            dataclasses.replace(spec, sha256="0" * 64),
        )
        with pytest.raises(WeightsError, match="checksum mismatch"):
            load_matcher_weights("lightglue")
        assert not (tmp_path / "cache" / served.name).exists() and "Apache" not in capsys.readouterr().err
        actual = hashlib.sha256(served.read_bytes()).hexdigest()
        monkeypatch.setitem(
            matcher_weights.MATCHER_WEIGHTS, "lightglue-superpoint", dataclasses.replace(spec, sha256=actual)
        )
        first = load_matcher_weights("lightglue")  # the default name
        again = load_matcher_weights("lightglue", "lightglue-superpoint")
        assert server.hits == {"/mirror/superpoint_lightglue.pth": 2}  # the refused one, then this one
        assert capsys.readouterr().err.count("Apache-2.0") == 1
        assert first.label == again.label == "lightglue-superpoint" and first.sha1 == again.sha1
    finally:
        server.close()


def test_options_are_validated_and_recorded() -> None:
    assert MatchConfig().settings() == {  # nearest neighbours record what they always did
        "mutual": True,
        "ratio": None,
        "max_distance": None,
        "verify": None,
        "verify_threshold": None,
    }
    settings = MatchConfig(matcher="lightglue", depth_confidence=-1).settings()
    assert settings == {
        "matcher": "lightglue",
        "depth_confidence": -1,
        "width_confidence": 0.99,
        "filter_threshold": 0.1,
        "verify": None,
        "verify_threshold": None,
    }
    assert MatchConfig(matcher="superglue").learned_options() == {
        "sinkhorn_iterations": 100,
        "match_threshold": 0.2,
    }
    refused = [
        ({"matcher": "loftr"}, "--matcher must be one of"),
        ({"matcher": "superglue", "ratio": 0.8}, "apply to --matcher nn only"),
        ({"matcher": "lightglue", "mutual": False}, "apply to --matcher nn only"),
        ({"sinkhorn_iterations": 50}, "--sinkhorn-iterations applies to --matcher superglue only"),
        (
            {"matcher": "superglue", "filter_threshold": 0.1},
            "--filter-threshold applies to --matcher lightglue",
        ),
        ({"matcher_weights": "superglue-indoor"}, "--matcher-weights needs --matcher superglue or lightglue"),
        ({"matcher": "superglue", "sinkhorn_iterations": 0}, "--sinkhorn-iterations must be >= 1"),
        ({"matcher": "superglue", "match_threshold": 1.0}, r"--match-threshold must be in \[0, 1\)"),
        ({"matcher": "lightglue", "width_confidence": 0.0}, r"--width-confidence must be in \(0, 1\], or -1"),
    ]
    for options, message in refused:
        with pytest.raises(ConfigError, match=message):
            MatchConfig(**options)


def test_cli_matches_with_a_learned_matcher_and_refuses_other_settings(
    tmp_path: Path, superglue: Reference, lightglue: Reference
) -> None:
    rng = np.random.default_rng(11)
    images = {f"{name}.jpg": random_image(rng, n, True) for name, n in (("a", 150), ("b", 120), ("c", 90))}
    features = write_features(tmp_path / "feats.h5", images)
    (tmp_path / "pairs.txt").write_text("a.jpg b.jpg\nb.jpg c.jpg\na.jpg c.jpg\n")
    out = tmp_path / "matches.h5"
    base = ["match-pairs", str(tmp_path / "pairs.txt"), "--features", str(features), "--out", str(out)]
    result = run_cli(*base, "--matcher", "lightglue", "--matcher-weights", str(lightglue.checkpoint),
                     "--filter-threshold", "0", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = build_matcher(
        load_matcher_weights("lightglue", str(lightglue.checkpoint)), {"filter_threshold": 0.0}
    )
    with h5py.File(out, "r") as h5:
        for name0, name1 in (("a.jpg", "b.jpg"), ("b.jpg", "c.jpg"), ("a.jpg", "c.jpg")):
            matches, scores = match_batch(model, [as_tensors(images[name0])], [as_tensors(images[name1])])
            stored = h5[pair_key(name0, name1)]
            np.testing.assert_array_equal(stored["matches0"][()], matches[0].numpy())
            np.testing.assert_allclose(stored["matching_scores0"][()], scores[0].numpy().astype(np.float16))
        assert (h5[pair_key("a.jpg", "b.jpg")]["matches0"][()] >= 0).sum() > 10

    other = run_cli(*base, "--matcher", "superglue", "--matcher-weights", str(superglue.checkpoint))
    assert other.returncode == 2 and "made with other settings" in other.stderr and "matcher" in other.stderr
    bad = run_cli(*base, "--matcher", "superglue", "--ratio", "0.8")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--no-mutual, --ratio and --max-distance apply to --matcher nn only" in bad.stderr


def test_the_product_does_not_import_transformers() -> None:
    package = Path(__file__).resolve().parents[1] / "sp_extract"
    for path in package.rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+transformers\b", path.read_text(), re.MULTILINE), path
