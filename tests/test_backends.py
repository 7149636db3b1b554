"""Network backends and the pipeline around them (issue 5).

Every backend reproduces the plain reference network (``superpoint_reference``) on a real photo,
dense outputs and keypoints alike; the ONNX export is cached by weights; backend choice and
precision are recorded as they should be; the background writer counts only durable entries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from support.superpoint_reference import assert_same_features, dense_v1
from support.superpoint_reference import postprocess as reference_postprocess

from sp_extract.errors import ConfigError, StoreError
from sp_extract.extraction import onnx_export
from sp_extract.extraction.backends import choose_backend, make_backend
from sp_extract.extraction.config import ExtractConfig, ExtractRun
from sp_extract.extraction.decode import load_image
from sp_extract.extraction.pipeline import BackgroundWriter, extract
from sp_extract.extraction.postprocess import postprocess
from sp_extract.extraction.weights import load_weights

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Exports go to a per-test cache, never the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SP_EXTRACT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def photo_reference(real_weights: Path, sacre_coeur: Path) -> tuple[torch.Tensor, tuple, list]:
    """A real photo at 512 px, the reference network's dense outputs on it and its features."""
    name = sorted(p.name for p in sacre_coeur.glob("*.jpg"))[1]
    image = torch.from_numpy(load_image(sacre_coeur, name, ExtractConfig(resize_max=512)).image)[None, None]
    state = torch.load(real_weights, map_location="cpu", weights_only=True)
    with torch.no_grad():
        scores, descriptors = dense_v1(state, image)
    features = reference_postprocess(scores[0].numpy(), descriptors[0].numpy(), 0.005, 4, 4, -1)
    return image, (scores, descriptors), features


# every backend; on a GPU machine also PyTorch on the GPU
RUNNERS = [("torch", "cpu"), ("onnxruntime", "cpu"), ("openvino", "cpu")]
RUNNERS += [("torch", "cuda")] if torch.cuda.is_available() else []


@pytest.mark.parametrize(("name", "device"), RUNNERS)
def test_backend_reproduces_reference_on_photo(
    name: str, device: str, real_weights: Path, photo_reference: tuple, private_cache: Path
) -> None:
    image, reference, ref_features = photo_reference
    loaded = load_weights(str(real_weights))
    backend = make_backend(name, loaded.build(), torch.device(device), "fp32", 2, loaded.sha1)
    scores, descriptors = backend(image)
    (features,) = postprocess(scores, descriptors, 0.005, 4, 4, -1)  # on the backend's device
    scores, descriptors = scores.cpu(), descriptors.cpu()
    assert scores.dtype == descriptors.dtype == torch.float32
    assert scores.shape == reference[0].shape and descriptors.shape == reference[1].shape
    np.testing.assert_allclose(scores.numpy(), reference[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(descriptors.numpy(), reference[1].numpy(), rtol=0, atol=1e-4)
    assert len(ref_features.keypoints) > 300  # a real photo: many keypoints to agree on
    assert_same_features(features, ref_features)
    assert backend.name.startswith(name)


def test_onnx_export_is_cached_by_weights_hash(
    random_weights: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_weights(str(random_weights))
    first = onnx_export.onnx_model(loaded.build(), loaded.sha1)
    cached = list((private_cache / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == first

    def no_export(*args: object) -> None:
        raise AssertionError("exported again although cached")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    assert onnx_export.onnx_model(loaded.build(), loaded.sha1) == first
    monkeypatch.undo()
    monkeypatch.setenv("SP_EXTRACT_CACHE", str(private_cache))
    onnx_export.onnx_model(loaded.build(), "0" * 40)  # other weights: another file
    assert len(list((private_cache / "onnx").glob("*.onnx"))) == 2


def test_unwritable_cache_still_runs(
    random_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SP_EXTRACT_CACHE", str(blocker))
    loaded = load_weights(str(random_weights))
    backend = make_backend("onnxruntime", loaded.build(), CPU, "fp32", 1, loaded.sha1)
    scores, descriptors = backend(torch.rand(2, 1, 64, 96))
    assert scores.shape == (2, 64, 96) and descriptors.shape == (2, 256, 8, 12)


def test_backend_choice_rules() -> None:
    assert choose_backend("auto", CPU, "fp32") == "onnxruntime"
    assert choose_backend("auto", CPU, "bf16") == "torch"
    assert choose_backend("auto", torch.device("cuda"), "fp32") == "torch"
    assert choose_backend("openvino", CPU, "bf16") == "openvino"
    with pytest.raises(ConfigError, match="onnxruntime runs fp32 and int8 only"):
        choose_backend("onnxruntime", CPU, "fp16")
    with pytest.raises(ConfigError, match="CPU only"):
        choose_backend("openvino", torch.device("cuda"), "fp32")
    with pytest.raises(ConfigError, match="--backend tensorrt"):
        choose_backend("tensorrt", CPU, "fp32")


def test_missing_openvino_says_how_to_install(random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes "import openvino" fail
    loaded = load_weights(str(random_weights))
    with pytest.raises(ConfigError, match=r"pip install 'sp-extract\[openvino\]'"):
        make_backend("openvino", loaded.build(), CPU, "fp32", 1, loaded.sha1)


def test_decoding_workers_start_after_opencv_ran_threads_here(small_images: Path) -> None:
    """OpenCV's idle thread pool, copied into a forked worker, used to deadlock it (a hang)."""
    script = (
        "import sys, time, cv2, numpy as np\n"
        "from sp_extract.extraction.config import ExtractConfig\n"
        "from sp_extract.extraction.loader import decode_all\n"
        "cv2.setNumThreads(2)\n"
        "cv2.resize(np.ones((3000, 4000), np.float32), (1000, 750), interpolation=cv2.INTER_AREA)\n"
        "time.sleep(0.5)  # the pool's threads now wait for work\n"
        "items = list(decode_all(sys.argv[1], ['a.png', 'b.jpg'], ExtractConfig(), 1))\n"
        "print(len(items), cv2.getNumThreads())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(small_images)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]  # all decoded; the thread count is restored


def read_store(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with h5py.File(path, "r") as h5:
        keypoints = {name: h5[name]["keypoints"][()] for name in ("a.png", "b.jpg", "sub/c.png")}
        return keypoints, dict(h5.attrs)


def test_backends_give_the_same_store_and_resume_across_backends(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    threads = torch.get_num_threads()
    stores, timings = {}, {}
    for name in ("torch", "onnxruntime"):
        stores[name] = tmp_path / f"{name}.h5"
        summary = extract(
            small_images,
            stores[name],
            run=ExtractRun(weights=str(random_weights), backend=name, num_workers=0),
            timings=timings,
        )
        assert summary.exit_code == 0 and summary.done == 3
    assert set(timings) == {"decode", "network", "postprocess", "write"} and timings["network"] > 0
    assert torch.get_num_threads() == threads  # the thread budget is restored
    (torch_kp, torch_attrs), (ort_kp, ort_attrs) = (
        read_store(stores["torch"]),
        read_store(stores["onnxruntime"]),
    )
    for name in torch_kp:
        np.testing.assert_array_equal(torch_kp[name], ort_kp[name])
    assert torch_attrs["backend"].startswith("torch") and ort_attrs["backend"].startswith("onnxruntime")
    assert json.loads(ort_attrs["sp_extract_settings"])["precision"] == "fp32"
    assert "backend" not in json.loads(ort_attrs["sp_extract_settings"])
    # an fp32 backend gives the same features: resuming with another one is accepted
    (small_images / "d.png").write_bytes((small_images / "a.png").read_bytes())
    summary = extract(
        small_images, stores["torch"], run=ExtractRun(str(random_weights), backend="onnxruntime")
    )
    assert (summary.done, summary.skipped) == (1, 3)


@pytest.mark.parametrize(("precision", "backend"), [("bf16", "torch"), ("int8", "onnxruntime")])
def test_precision_is_a_store_setting(
    small_images: Path, random_weights: Path, tmp_path: Path, precision: str, backend: str
) -> None:
    store = tmp_path / f"{precision}.h5"
    config = ExtractConfig(precision=precision)
    summary = extract(small_images, store, config, ExtractRun(weights=str(random_weights), num_workers=0))
    assert summary.exit_code == 0 and summary.done == 3
    with h5py.File(store, "r") as h5:
        assert json.loads(h5.attrs["sp_extract_settings"])["precision"] == precision
        assert h5.attrs["backend"].startswith(backend)  # auto: bf16 runs on torch, int8 on onnxruntime
    with pytest.raises(StoreError, match=f"precision: '{precision}' \\(store\\) vs 'fp32' \\(now\\)"):
        extract(small_images, store, run=ExtractRun(weights=str(random_weights)))
    (small_images / "d.png").write_bytes((small_images / "a.png").read_bytes())
    summary = extract(small_images, store, config, ExtractRun(weights=str(random_weights), num_workers=0))
    assert (summary.done, summary.skipped) == (1, 3)  # same precision: resumed
    with pytest.raises(ConfigError, match="--precision"):
        ExtractConfig(precision="fp8")


class FakeStore:
    """Makes entries durable two at a time, as StoreWriter's flush does; fails on ``fail_on``;
    holds the first entry until ``gate`` is set."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.pending: list[str] = []
        self.durable: list[str] = []

    def add(self, name: str, datasets: dict, attrs: dict) -> list[str]:
        self.entered.set()
        self.gate.wait()
        if name == self.fail_on:
            raise StoreError(f"{name}: disk full")
        self.pending.append(name)
        return self.flush() if len(self.pending) == 2 else []

    def flush(self) -> list[str]:
        done, self.pending = self.pending, []
        self.durable += done
        return done


def entry(name: str) -> Callable[[], list]:
    """A writer job making one empty entry."""
    return lambda: [(name, {}, {})]


def test_background_writer_counts_only_durable_entries() -> None:
    store = FakeStore()
    writer = BackgroundWriter(store, depth=1)
    for name in "abc":
        writer.add(entry(name))
    counted = writer.saved()
    assert counted <= len(store.durable) <= 2  # "c" waits for the final flush
    assert counted + writer.close() == 3
    assert store.durable == ["a", "b", "c"]


def test_background_writer_reraises_errors_of_its_thread() -> None:
    writer = BackgroundWriter(FakeStore(fail_on="b"))
    writer.add(entry("a"))
    writer.add(entry("b"))
    with pytest.raises(StoreError, match="b: disk full"):
        writer.close()


def test_background_writer_abandon_drops_what_is_queued() -> None:
    store = FakeStore()
    store.gate.clear()  # the thread holds "a" until the gate opens
    writer = BackgroundWriter(store)
    for name in "abc":
        writer.add(entry(name))
    assert store.entered.wait(10)  # the thread is writing "a"; "b" and "c" wait in the queue
    threading.Timer(0.2, store.gate.set).start()
    writer.abandon()
    assert store.pending == ["a"] and store.durable == []
