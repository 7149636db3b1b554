"""``--precision int8`` (issue 16): the quantized graph is made, cached under the right key,
close to the plain reference network on a real photo, and a setting of the store; its variant
follows the CPU (issue 22), and both variants are checked on this one.

Calibration here is a few small generated images (``BUILTIN_SHAPE`` patched), so that each
quantization takes a second or two; benchmarks/int8_accuracy.py measures the shipped set.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli
from support.superpoint_reference import dense_v1
from support.superpoint_reference import postprocess as reference_postprocess

from sp_extract.errors import ConfigError
from sp_extract.extraction import quantize
from sp_extract.extraction.backends import choose_backend, export_model, make_backend
from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.decode import load_image
from sp_extract.extraction.pipeline import SuperPoint
from sp_extract.extraction.postprocess import postprocess
from sp_extract.extraction.weights import load_weights

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def small_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-test cache and a built-in calibration set of three 96 x 128 images."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SP_EXTRACT_CACHE", str(cache))
    monkeypatch.setattr(quantize, "BUILTIN_SHAPE", (3, 96, 128))
    return cache


def operators(model: bytes) -> dict[str, str]:
    """Node name: operator type of an ONNX graph."""
    return {node.name: node.op_type for node in onnx.load_from_string(model).graph.node}


def quantization(model: bytes) -> tuple[set[str], set[str]]:
    """Nodes whose weights are dequantized int8, and tensors that are quantized."""
    graph = onnx.load_from_string(model).graph
    dequantized = {
        output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output
    }
    int8_weights = {node.name for node in graph.node if len(node.input) > 1 and node.input[1] in dequantized}
    quantized = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    return int8_weights, quantized


def test_int8_graph_is_cached_by_weights_code_and_calibration(
    random_weights: Path, small_calibration: Path, small_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_weights(str(random_weights))
    first = quantize.int8_model(loaded.build(), loaded.sha1)
    names = {p.name for p in (small_calibration / "onnx").glob("*.onnx")}
    assert len(names) == 2 and len({n for n in names if n.startswith("superpoint-int8-")}) == 1  # + fp32
    kinds = operators(first)
    assert list(kinds.values()).count("Conv") == 12 and "QuantizeLinear" in kinds.values()
    # every convolution but the detector's last has int8 weights; what is kept float is not quantized
    int8_weights, quantized = quantization(first)
    convolutions = {name for name, kind in kinds.items() if kind == "Conv"}
    assert int8_weights == convolutions - {"/convPb/Conv"}
    graph = onnx.load_from_string(first).graph
    float_outputs = {o for node in graph.node if node.name in quantize.FLOAT_NODES for o in node.output}
    assert len(float_outputs) == len(quantize.FLOAT_NODES) and not float_outputs & quantized

    def no_quantize(*args: object) -> bytes:
        raise AssertionError("quantized again although cached")

    monkeypatch.setattr(quantize, "quantize", no_quantize)
    assert quantize.int8_model(loaded.build(), loaded.sha1) == first
    monkeypatch.undo()
    monkeypatch.setenv("SP_EXTRACT_CACHE", str(small_calibration))
    monkeypatch.setattr(quantize, "BUILTIN_SHAPE", (3, 96, 128))
    quantize.int8_model(loaded.build(), "0" * 40)  # other weights: another file
    quantize.int8_model(loaded.build(), loaded.sha1, quantize.folder_calibration(small_images))
    monkeypatch.setattr(quantize, "BUILTIN_SHAPE", (2, 96, 128))  # another calibration set
    quantize.int8_model(loaded.build(), loaded.sha1)
    assert len(list((small_calibration / "onnx").glob("superpoint-int8-*.onnx"))) == 4
    for variant in quantize.VARIANTS:  # another variant: another file, its weights of its type
        monkeypatch.setenv(quantize.VARIANT_ENV, variant)
        assert weight_types(quantize.int8_model(loaded.build(), loaded.sha1)) == {WEIGHT_TYPES[variant]}
    assert len(list((small_calibration / "onnx").glob("superpoint-int8-*.onnx"))) == 5


def weight_types(model: bytes) -> set[int]:
    """The ONNX element types of the quantized weights (initializers dequantized per channel)."""
    graph = onnx.load_from_string(model).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    return {
        initializers[node.input[0]].data_type
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in initializers
        and len(initializers[node.input[0]].dims) == 4  # a convolution's weights
    }


WEIGHT_TYPES = {"u8s8": onnx.TensorProto.INT8, "u8u8": onnx.TensorProto.UINT8}


@pytest.mark.parametrize(
    ("machine", "flags", "variant"),
    [
        ("x86_64", "fpu sse2 avx2 avx512f avx512bw avx512_vnni", "u8s8"),  # Cascade Lake, Zen 4
        ("x86_64", "fpu sse2 avx2 avx_vnni", "u8s8"),  # Alder Lake
        ("AMD64", "sse2 avx2 avx_vnni", "u8s8"),  # Windows spells it so
        ("x86_64", "fpu sse2 avx avx2 fma", "u8u8"),  # Haswell to Zen 3: saturating u8 x s8
        ("x86_64", "sse2 avx2 avx512f avx512bw", "u8u8"),  # Skylake-SP: AVX-512 without VNNI
        ("x86_64", None, "u8u8"),  # flags unknown: the exact one
        ("aarch64", "fp asimd asimddp", "u8s8"),
        ("aarch64", "fp asimd", "u8s8"),  # ARM's kernels sum in 32 bits, dot product or not
        ("arm64", None, "u8s8"),  # macOS
    ],
)
def test_int8_variant_follows_the_cpu(machine: str, flags: str | None, variant: str) -> None:
    assert quantize.choose_variant(machine, None if flags is None else frozenset(flags.split())) == variant


def test_int8_variant_reads_the_cpu_flags_and_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x86, arm, other = tmp_path / "x86", tmp_path / "arm", tmp_path / "other"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp\n")
    other.write_text("processor\t: 0\n")
    assert quantize.cpu_flags(x86) == {"fpu", "avx2", "avx512_vnni"}  # the first CPU's
    assert quantize.cpu_flags(arm) == {"fp", "asimd", "asimddp"}
    assert quantize.cpu_flags(other) is None and quantize.cpu_flags(tmp_path / "none") is None
    for variant in quantize.VARIANTS:
        monkeypatch.setenv(quantize.VARIANT_ENV, variant)
        assert quantize.int8_variant() == variant
    monkeypatch.setenv(quantize.VARIANT_ENV, "u8s8-7bit")
    with pytest.raises(ConfigError, match="SP_EXTRACT_INT8_VARIANT=u8s8-7bit: not an int8 variant .*u8u8"):
        quantize.int8_variant()


@pytest.mark.parametrize("forced", [None, "u8u8"])  # this CPU's variant; the one for x86 without VNNI
def test_int8_is_close_to_the_reference_network_on_a_photo(
    real_weights: Path, sacre_coeur: Path, forced: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if forced:
        monkeypatch.setenv(quantize.VARIANT_ENV, forced)
    name = sorted(p.name for p in sacre_coeur.glob("*.jpg"))[2]
    image = torch.from_numpy(load_image(sacre_coeur, name, ExtractConfig(resize_max=320)).image)[None, None]
    state = torch.load(real_weights, map_location="cpu", weights_only=True)
    with torch.no_grad():
        ref_scores, ref_descriptors = dense_v1(state, image)
    reference = reference_postprocess(ref_scores[0].numpy(), ref_descriptors[0].numpy(), 0.005, 4, 4, -1)
    loaded = load_weights(str(real_weights))
    backend = make_backend("onnxruntime", loaded.build(), CPU, "int8", 2, loaded.sha1)
    variant = forced or quantize.choose_variant(platform.machine(), quantize.cpu_flags())
    assert backend.name.startswith("onnxruntime") and backend.name.endswith(f"(cpu, int8 {variant})")
    scores, descriptors = backend(image)
    assert scores.shape == ref_scores.shape and descriptors.shape == ref_descriptors.shape
    assert not torch.equal(descriptors, ref_descriptors)  # it is another network
    # dense descriptors: unit norm (normalised in float), pointing the same way
    np.testing.assert_allclose(descriptors.norm(dim=1).numpy(), 1.0, atol=1e-4)
    cosine = (descriptors * ref_descriptors).sum(1).flatten()
    assert cosine.median() > 0.99 and torch.quantile(cosine, 0.01) > 0.9
    # keypoints: most of the reference's found again within 1 px
    (features,) = postprocess(scores, descriptors, 0.005, 4, 4, -1)
    ref_keypoints = torch.from_numpy(np.asarray(reference.keypoints, dtype=np.float32))
    assert len(ref_keypoints) > 150
    nearest = torch.cdist(ref_keypoints, features.keypoints).min(1).values
    assert (nearest <= 1.0).float().mean() > 0.85
    assert 0.8 < len(features.keypoints) / len(ref_keypoints) < 1.25


def test_int8_backend_rules(random_weights: Path) -> None:
    assert choose_backend("auto", CPU, "int8") == "onnxruntime"
    assert choose_backend("openvino", CPU, "int8") == "openvino"
    with pytest.raises(ConfigError, match="int8 runs on the CPU only.*not torch"):
        choose_backend("torch", CPU, "int8")
    with pytest.raises(ConfigError, match="int8 runs on the CPU only.*not cuda"):
        choose_backend("auto", torch.device("cuda"), "int8")
    with pytest.raises(ConfigError, match="not PyTorch"):  # the API's module runs PyTorch
        SuperPoint(str(random_weights), ExtractConfig(precision="int8"))(torch.rand(1, 1, 64, 96))


def test_cli_exports_int8_calibrated_on_a_folder(
    random_weights: Path, small_images: Path, tmp_path: Path, small_calibration: Path
) -> None:
    out = tmp_path / "int8.onnx"
    env = {"SP_EXTRACT_CACHE": str(small_calibration)}
    weights = ("--weights", str(random_weights))
    done = run_cli(
        "export", str(out), "--precision", "int8", "--calibrate", str(small_images), *weights, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "QuantizeLinear" in operators(out.read_bytes()).values()
    cached = list((small_calibration / "onnx").glob("superpoint-int8-*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == out.read_bytes()
    cases = {
        ("fp32", small_images): "--calibrate sets the ranges of an int8 network",
        ("int8", tmp_path / "none"): "none: not a folder",
        ("int8", small_images / "sub" / "c.png"): "c.png: not a folder",
        ("int8", tmp_path / "cache"): "no images found",
    }
    for (precision, folder), message in cases.items():
        with pytest.raises(ConfigError, match=message):
            export_model(tmp_path / "x.onnx", "onnx", str(random_weights), precision, folder)
