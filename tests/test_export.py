"""``sp-extract export``: the deployed network reproduces the plain reference network (issue 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import openvino
import torch
from conftest import run_cli
from support.superpoint_reference import dense_v1

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.decode import load_image


def reference(weights: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    with torch.no_grad():
        scores, descriptors = dense_v1(state, torch.from_numpy(images))
    return scores.numpy(), descriptors.numpy()


def test_exported_onnx_reproduces_reference_on_photo(
    real_weights: Path, sacre_coeur: Path, tmp_path: Path
) -> None:
    out = tmp_path / "superpoint.onnx"
    done = run_cli(
        "export", str(out), "--weights", str(real_weights), env={"SP_EXTRACT_CACHE": str(tmp_path)}
    )
    assert done.returncode == 0, done.stderr
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["scores", "descriptors"]
    name = sorted(p.name for p in sacre_coeur.glob("*.jpg"))[0]
    photo = load_image(sacre_coeur, name, ExtractConfig(resize_max=400)).image
    # dynamic axes: a batch of two at the photo's size, then one crop of another size
    for images in (np.stack([photo, photo[::-1, ::-1]])[:, None], photo[None, None, 13:213, 7:311]):
        images = np.ascontiguousarray(images)
        scores, descriptors = session.run(None, {"image": images})
        ref_scores, ref_descriptors = reference(real_weights, images)
        assert scores.shape == ref_scores.shape and descriptors.shape == ref_descriptors.shape
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(descriptors, ref_descriptors, rtol=0, atol=1e-4)


def test_exported_openvino_reproduces_reference(random_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "superpoint.xml"
    done = run_cli(
        "export",
        str(out),
        "--format",
        "openvino",
        "--weights",
        str(random_weights),
        env={"SP_EXTRACT_CACHE": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = np.random.default_rng(0).random((2, 1, 72, 96), dtype=np.float32)
    result = compiled({"image": images})
    ref_scores, ref_descriptors = reference(random_weights, images)
    np.testing.assert_allclose(result["scores"], ref_scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result["descriptors"], ref_descriptors, rtol=0, atol=1e-4)


def test_export_errors_are_one_line(random_weights: Path, tmp_path: Path) -> None:
    cases = {
        "--format openvino needs .xml": (
            [str(tmp_path / "model.onnx"), "--format", "openvino"],
            "model.onnx: an OpenVINO model is written as NAME.xml",
        ),
        "missing folder": ([str(tmp_path / "no" / "model.onnx")], "the folder"),
    }
    for args, message in cases.values():
        done = run_cli("export", *args, "--weights", str(random_weights))
        assert done.returncode == 2
        assert done.stderr.startswith("sp-extract: error: ") and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
