"""Weights: every file layout and container, refusals, and the download path on a loopback server.

State dicts are written by the tests in each published layout (Magic Leap v1, rpautrat v6,
Hugging Face transformers) as PyTorch pickles and as hand-written safetensors files; networks are
compared with the plain reference forward of ``superpoint_reference``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_image
from support.superpoint_reference import dense_v1, dense_v6, random_v6_state

from sp_extract.errors import WeightsError
from sp_extract.extraction import weights
from sp_extract.extraction.weights import load_weights

# Magic Leap layer -> transformers' SuperPointForKeypointDetection module
V1_TO_HF = {
    **{f"{block + 1}{ab}": f"encoder.conv_blocks.{block}.conv_{ab}" for block in range(4) for ab in "ab"},
    "Pa": "keypoint_decoder.conv_score_a",
    "Pb": "keypoint_decoder.conv_score_b",
    "Da": "descriptor_decoder.conv_descriptor_a",
    "Db": "descriptor_decoder.conv_descriptor_b",
}
LICENCE_MARK = "non-commercial"


def git_blob_sha1(data: bytes) -> str:
    """``git hash-object``: SHA-1 of ``blob <size>\\0`` followed by the content."""
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The safetensors format by hand: u64 LE header size, JSON header, concatenated raw data."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for key, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[key] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def to_hf(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        layer, param = key.removeprefix("conv").split(".")
        renamed[f"{prefix}{V1_TO_HF[layer]}.{param}"] = tensor
    return renamed


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        return write_safetensors(path, state)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def v1_state(random_weights: Path) -> dict[str, torch.Tensor]:
    state = torch.load(random_weights, weights_only=True)
    assert sorted(state) == sorted(f"conv{layer}.{p}" for layer in V1_TO_HF for p in ("weight", "bias"))
    return state


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 1, 48, 64, generator=torch.Generator().manual_seed(0))


def dense(path: Path, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return load_weights(str(path)).build()(image)


def assert_dense_equal(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> None:
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("layout", "filename"),
    [
        ("v1", "superpoint_v1.pth"),
        ("v1", "superpoint_v1.safetensors"),
        ("hf", "pytorch_model.bin"),
        ("hf", "model.safetensors"),
        ("hf-prefixed", "pytorch_model.bin"),
        ("hf-prefixed", "model.safetensors"),
    ],
)
def test_v1_and_hugging_face_layouts_load_to_the_same_network(
    tmp_path, v1_state, image, layout, filename
) -> None:
    state = {"v1": v1_state, "hf": to_hf(v1_state), "hf-prefixed": to_hf(v1_state, "superpoint.")}[layout]
    path = save(state, tmp_path / filename)
    loaded = load_weights(str(path))
    assert not loaded.batch_norm
    assert loaded.sha1 == git_blob_sha1(path.read_bytes())
    assert loaded.label == filename
    assert_dense_equal(dense(path, image), dense_v1(v1_state, image))


@pytest.mark.parametrize("filename", ["superpoint_v6_from_tf.pth", "superpoint_v6.safetensors"])
@pytest.mark.parametrize("counters", [True, False], ids=["with-counters", "without-counters"])
def test_v6_layout_loads_with_batchnorm(tmp_path, image, filename, counters) -> None:
    state = random_v6_state(seed=1)
    if not counters:  # num_batches_tracked plays no part in inference; exports may drop it
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = save(state, tmp_path / filename)
    assert load_weights(str(path)).batch_norm
    assert_dense_equal(dense(path, image), dense_v6(state, image))


def test_wrapped_checkpoint_and_half_precision_safetensors(tmp_path, v1_state, image) -> None:
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": v1_state, "epoch": 3}, wrapped)
    assert_dense_equal(dense(wrapped, image), dense_v1(v1_state, image))
    half = {k: v.half() for k, v in to_hf(v1_state).items()}
    path = write_safetensors(tmp_path / "model.safetensors", half)
    rounded = {k: v.half().float() for k, v in v1_state.items()}
    assert_dense_equal(dense(path, image), dense_v1(rounded, image))


def refusal(path: Path, match: str) -> None:
    with pytest.raises(WeightsError, match=match) as raised:
        load_weights(str(path))
    message = str(raised.value)
    assert str(path) in message and "\n" not in message


def test_refuses_files_that_are_not_weights(tmp_path) -> None:
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    refusal(noise, "not a readable weights file")
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    refusal(text, "not a readable weights file")
    fake = tmp_path / "model.safetensors"
    fake.write_text("{}\n" * 10)
    refusal(fake, "not a readable weights file")
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], listing)
    refusal(listing, "not a state dict of tensors")
    refusal(tmp_path, "a folder, not a weights file")
    with pytest.raises(WeightsError, match="no such weights file, and not a known name"):
        load_weights(str(tmp_path / "missing.pth"))


def test_refuses_state_dicts_that_are_not_superpoint(tmp_path, v1_state) -> None:
    refusal(
        save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth"), "not SuperPoint weights.*fc.weight"
    )
    refusal(save({}, tmp_path / "empty.safetensors"), "not SuperPoint weights")
    incomplete = {k: v for k, v in to_hf(v1_state).items() if not k.endswith("conv_descriptor_b.bias")}
    refusal(save(incomplete, tmp_path / "incomplete.safetensors"), "missing convDb.bias")
    v6 = random_v6_state()
    del v6["backbone.2.1.bn.running_var"]
    refusal(save(v6, tmp_path / "v6.pth"), "missing bn3b.running_var")
    wrong = {**v1_state, "convPb.weight": torch.zeros(64, 256, 1, 1)}
    refusal(save(wrong, tmp_path / "wrong.pth"), r"convPb.weight has shape \(64, 256, 1, 1\), expected")


def test_cli_refuses_bad_weights_with_one_line_and_exit_2(tmp_path) -> None:
    write_image(tmp_path / "images" / "a.png")
    bad = tmp_path / "bad.pth"
    bad.write_text("hello")
    result = run_cli(str(tmp_path / "images"), "--out", str(tmp_path / "f.h5"), "--weights", str(bad))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{bad}: not a readable weights file" in result.stderr


class WeightsServer:
    """A real HTTP server on 127.0.0.1 serving ``root``, counting requests per path."""

    def __init__(self, root: Path) -> None:
        hits: dict[str, int] = {}

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.hits = hits
        self.root = root
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path, monkeypatch) -> Iterator[WeightsServer]:
    (tmp_path / "served" / "mirror").mkdir(parents=True)
    running = WeightsServer(tmp_path / "served")
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("SP_EXTRACT_WEIGHTS", raising=False)
    monkeypatch.setenv("SP_EXTRACT_MIRROR", running.url)
    monkeypatch.setenv("SP_EXTRACT_CACHE", str(tmp_path / "cache"))
    yield running
    running.close()


def publish(server: WeightsServer, source: Path, monkeypatch, sha1: str | None = None) -> tuple[Path, str]:
    """Serve ``source`` as the v1 file and make its git SHA-1 (or ``sha1``) the expected one."""
    filename = weights.NAMED_WEIGHTS["superpoint-v1"].url.rsplit("/", 1)[1]
    served = server.root / "mirror" / filename
    shutil.copyfile(source, served)
    actual = git_blob_sha1(served.read_bytes())
    git = subprocess.run(["git", "hash-object", str(served)], capture_output=True, text=True, check=True)
    assert git.stdout.strip() == actual
    spec = dataclasses.replace(weights.NAMED_WEIGHTS["superpoint-v1"], git_blob_sha1=sha1 or actual)
    monkeypatch.setitem(weights.NAMED_WEIGHTS, "superpoint-v1", spec)
    return served, f"/mirror/{filename}"


def cached_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_download_verifies_caches_and_prints_the_licence_once(
    tmp_path, server, monkeypatch, capsys, random_weights, v1_state, image
) -> None:
    served, url_path = publish(server, random_weights, monkeypatch)
    first = load_weights("superpoint-v1")
    assert server.hits == {url_path: 1}
    assert cached_files(tmp_path) == [tmp_path / "cache" / served.name]
    assert cached_files(tmp_path)[0].read_bytes() == served.read_bytes()
    assert capsys.readouterr().err.count(LICENCE_MARK) == 1
    assert first.sha1 == git_blob_sha1(served.read_bytes()) and first.label == "superpoint-v1"
    again = load_weights()  # the default name, now from the cache
    assert server.hits == {url_path: 1}
    assert LICENCE_MARK not in capsys.readouterr().err
    assert again.sha1 == first.sha1
    with torch.inference_mode():
        assert_dense_equal(again.build()(image), dense_v1(v1_state, image))


def test_bad_checksum_is_refused_and_nothing_cached(tmp_path, server, monkeypatch, capsys, random_weights):
    publish(server, random_weights, monkeypatch, sha1="0" * 40)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_weights("superpoint-v1")
    assert sum(server.hits.values()) == 1
    assert cached_files(tmp_path) == []
    assert LICENCE_MARK not in capsys.readouterr().err


def test_corrupt_cache_is_downloaded_again(tmp_path, server, monkeypatch, random_weights) -> None:
    served, url_path = publish(server, random_weights, monkeypatch)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / served.name).write_bytes(b"truncated")
    load_weights("superpoint-v1")
    assert server.hits == {url_path: 1}
    assert (tmp_path / "cache" / served.name).read_bytes() == served.read_bytes()


def test_unwritable_cache_is_a_clear_error(tmp_path, server, monkeypatch, random_weights) -> None:
    publish(server, random_weights, monkeypatch)
    (tmp_path / "blocker").write_text("a file where the cache folder should go")
    monkeypatch.setenv("SP_EXTRACT_CACHE", str(tmp_path / "blocker" / "cache"))
    with pytest.raises(WeightsError, match="cannot write the weights cache.*SP_EXTRACT_CACHE"):
        load_weights("superpoint-v1")


def test_offline_error_says_how_to_pass_a_file(tmp_path, server, monkeypatch, random_weights) -> None:
    publish(server, random_weights, monkeypatch)
    server.close()  # nothing listens on the port any more
    with pytest.raises(WeightsError, match="--weights") as raised:
        load_weights("superpoint-v1")
    assert "offline" in str(raised.value)
    assert cached_files(tmp_path) == []


def test_environment_variable_overrides_the_default(tmp_path, server, monkeypatch, v1_state, image) -> None:
    local = save(to_hf(v1_state), tmp_path / "model.safetensors")
    monkeypatch.setenv("SP_EXTRACT_WEIGHTS", str(local))
    loaded = load_weights()
    assert loaded.sha1 == git_blob_sha1(local.read_bytes())
    assert server.hits == {}
    other = random_v6_state()
    explicit = save(other, tmp_path / "v6.pth")
    assert load_weights(str(explicit)).batch_norm  # an explicit --weights wins over the variable
    with torch.inference_mode():
        assert_dense_equal(loaded.build()(image), dense_v1(v1_state, image))
