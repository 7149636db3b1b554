"""GPU and Apple Silicon behaviour (issue 17), shown on the CPU with monkeypatched device APIs.

No GPU or Mac runs these tests: each fake below says what it stands in for. What the fakes
check is the order and the target of the device calls (which device, which stream, which
thread), the part that went wrong before; PyTorch's own CUDA and MPS semantics are assumed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import write_image

from sp_extract import ExtractConfig, ExtractRun, extract
from sp_extract.devices import ShapeTuning, copy_to_host, for_other_thread, restored_settings, to_device
from sp_extract.errors import SpExtractWarning
from sp_extract.extraction import backends, pipeline
from sp_extract.extraction.backends import TorchBackend
from sp_extract.report import recording

CUDA1 = torch.device("cuda", 1)


class FakeCuda:
    """Stands in for ``torch.cuda`` on a machine with two GPUs: the device guard, the current
    streams and events, recording every call and the current device at the time."""

    def __init__(self) -> None:
        self.current = 0  # CUDA's current device, 0 until a guard changes it
        self.log: list[tuple] = []
        fake = self

        class Guard:
            def __init__(self, device: torch.device) -> None:
                self.index = device.index

            def __enter__(self) -> None:
                self.previous, fake.current = fake.current, self.index

            def __exit__(self, *exc: object) -> None:
                fake.current = self.previous

        class Event:
            def record(self, stream: tuple | None = None) -> None:
                # an event recorded without a stream records on the current device's stream
                fake.log.append(("record", stream or ("stream", fake.current)))

            def synchronize(self) -> None:
                fake.log.append(("synchronize",))

        def current_stream(device: torch.device | None = None) -> tuple:
            return ("stream", fake.current if device is None else device.index)

        self.device, self.Event, self.current_stream = Guard, Event, current_stream


class FakeDeviceTensor:
    """Stands in for a tensor on ``device`` (a CUDA GPU or MPS); copies to the CPU are logged
    with the current CUDA device and whether they were asynchronous."""

    def __init__(self, value: torch.Tensor, device: torch.device, cuda: FakeCuda | None = None) -> None:
        self.value, self.device, self.cuda = value, device, cuda
        self.copies: list[tuple] = []

    def to(self, target: str, non_blocking: bool = False) -> torch.Tensor:
        current = self.cuda.current if self.cuda else None
        self.copies.append((str(target), non_blocking, current))
        if self.cuda:
            self.cuda.log.append(("copy", current))
        return self.value.clone()

    def cpu(self) -> torch.Tensor:
        return self.to("cpu")


def test_results_of_gpu_1_are_copied_and_awaited_on_gpu_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """match-pairs --device cuda:1: the copies run under a guard for GPU 1 and the event that
    the host waits on is recorded on GPU 1's stream, the one that runs the copies (before,
    it was recorded on GPU 0's and did not wait for them)."""
    cuda = FakeCuda()
    for name in ("device", "Event", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    matches = FakeDeviceTensor(torch.tensor([[1, -1]], dtype=torch.int32), CUDA1, cuda)
    scores = FakeDeviceTensor(torch.tensor([[0.9, 0.0]]), CUDA1, cuda)

    pending = copy_to_host([matches, scores])

    assert matches.copies == scores.copies == [("cpu", True, 1)]  # asynchronous, GPU 1 current
    assert cuda.log == [("copy", 1), ("copy", 1), ("record", ("stream", 1))]
    host = pending.wait()
    assert cuda.log[-1] == ("synchronize",)
    assert torch.equal(host[0], matches.value) and torch.equal(host[1], scores.value)
    assert cuda.current == 0  # the guard is left as it was found


def test_copies_from_mps_and_the_cpu_are_blocking() -> None:
    """MPS: an asynchronous copy from or to memory freed right after it is unsafe, so copies
    block; a CUDA copy is asynchronous only from pinned memory."""
    on_mps = FakeDeviceTensor(torch.ones(2), torch.device("mps"))
    pending = copy_to_host([on_mps])
    assert pending.done is None and on_mps.copies == [("cpu", False, None)]
    assert torch.equal(pending.wait()[0], torch.ones(2))

    class HostTensor:  # stands in for a CPU batch, pinned or not
        device = torch.device("cpu")

        def __init__(self, pinned: bool) -> None:
            self.pinned = pinned

        def is_pinned(self) -> bool:
            return self.pinned

        def to(self, device: torch.device, non_blocking: bool = False) -> bool:
            return non_blocking

    cases = [("cuda", True, True), ("cuda", False, False), ("mps", True, False), ("mps", False, False)]
    for device, pinned, asynchronous in cases:
        assert to_device(HostTensor(pinned), torch.device(device)) is asynchronous, (device, pinned)


def test_mps_outputs_reach_the_writer_thread_on_the_cpu() -> None:
    """Post-processing runs on the writer's thread: MPS outputs are first copied to the CPU
    (blocking) by the thread that ran the network; CPU and CUDA outputs go as they are."""
    mps = (
        FakeDeviceTensor(torch.ones(1), torch.device("mps")),
        FakeDeviceTensor(torch.zeros(1), torch.device("mps")),
    )
    moved = for_other_thread(mps)
    assert [t.device.type for t in moved] == ["cpu", "cpu"] and mps[0].copies == [("cpu", False, None)]
    on_cuda = (FakeDeviceTensor(torch.ones(1), CUDA1),)
    on_cpu = (torch.ones(1), torch.zeros(1))
    assert for_other_thread(on_cuda) is on_cuda and not on_cuda[0].copies
    assert for_other_thread(on_cpu) is on_cpu


def test_pipeline_touches_the_device_on_the_main_thread_only(
    monkeypatch: pytest.MonkeyPatch, small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    """The network and the device-to-host step run on the thread that called ``extract``; the
    writer's thread post-processes what that step returned (on MPS: CPU tensors)."""
    calls: dict[str, list] = {"network": [], "handover": [], "postprocess": []}
    handed: list[int] = []
    run = pipeline.dense_outputs

    def network(*args: object) -> object:
        calls["network"].append(threading.current_thread())
        return run(*args)

    def handover(tensors: tuple) -> tuple:
        calls["handover"].append(threading.current_thread())
        copies = tuple(t.clone() for t in tensors)
        handed.append(id(copies[0]))
        return copies

    finish = pipeline.finish_batch

    def postprocess(model: object, images: list, dense: tuple, *args: object) -> list:
        calls["postprocess"].append((threading.current_thread(), id(dense[0])))
        return finish(model, images, dense, *args)

    monkeypatch.setattr(pipeline, "dense_outputs", network)
    monkeypatch.setattr(pipeline, "for_other_thread", handover)
    monkeypatch.setattr(pipeline, "finish_batch", postprocess)
    summary = extract(
        small_images, tmp_path / "f.h5", run=ExtractRun(weights=str(random_weights), device="cpu")
    )

    assert summary.done == 3
    main = threading.main_thread()
    assert calls["network"] == calls["handover"] == [main] * 3
    assert [thread.name for thread, _ in calls["postprocess"]] == ["sp-extract-writer"] * 3
    assert [identity for _, identity in calls["postprocess"]] == handed


def test_cuda_backend_tunes_only_shapes_that_repeat(
    monkeypatch: pytest.MonkeyPatch, random_weights: Path
) -> None:
    """cuDNN benchmark mode is on for a batch shape's second and later batches only: a folder
    where every photo has its own size is never tuned, shape by shape."""
    tuning = ShapeTuning()
    assert [tuning.benchmark(s) for s in [(1, 1, 8, 8), (1, 1, 8, 16), (1, 1, 8, 8), (2, 1, 8, 8)]] == [
        False,
        False,
        True,
        False,
    ]
    from sp_extract.extraction.weights import load_weights

    backend = TorchBackend(load_weights(str(random_weights)).build(), torch.device("cpu"), "fp32")
    backend.device = torch.device("cuda")  # stands in for a backend made on a GPU
    monkeypatch.setattr(backends, "to_device", lambda images, device: images)  # the copy to it
    seen = []
    monkeypatch.setattr(backends, "run_torch", lambda *a: seen.append(torch.backends.cudnn.benchmark))
    with restored_settings():
        for height in (16, 24, 16, 16):
            backend(torch.zeros(1, 1, height, 16))
    assert seen == [False, False, True, True]


def tf32_state() -> dict[str, object]:
    """What users read of cuDNN's process-wide flags (a legacy read may raise: recorded so)."""
    cudnn = torch.backends.cudnn
    state: dict[str, object] = {"benchmark": cudnn.benchmark}
    try:
        state["allow_tf32"] = cudnn.allow_tf32
    except RuntimeError:
        state["allow_tf32"] = "raises"
    if hasattr(cudnn, "fp32_precision"):
        state |= {f"{o}": getattr(cudnn, o).fp32_precision for o in ("conv", "rnn")}
    return state


@pytest.mark.parametrize("setup", ["legacy", "per-backend"])
def test_restored_settings_puts_flags_back_however_they_were_set(setup: str) -> None:
    """The run sets cuDNN's flags the way the torch backend does; afterwards they read as
    before, set by the user through the legacy flags or PyTorch's per-backend API."""
    cudnn = torch.backends.cudnn
    with restored_settings():  # the test's own changes do not outlive it
        if setup == "legacy":
            cudnn.benchmark, cudnn.allow_tf32 = False, True
        elif hasattr(cudnn, "fp32_precision"):
            cudnn.conv.fp32_precision = "ieee"  # conv and rnn differ: the legacy read raises
        before = tf32_state()
        with restored_settings():
            cudnn.benchmark, cudnn.allow_tf32 = True, False
        assert tf32_state() == before


class StandInBackend:
    """The real backend behind ``fault(images, call)``, which may raise first; each use says
    what the fault stands in for. Records the shape of every batch it is given."""

    def __init__(self, runner: object, fault: Callable[[torch.Tensor, int], None]) -> None:
        self.runner, self.fault, self.name = runner, fault, "stand-in"
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, images: torch.Tensor) -> tuple:
        self.shapes.append(tuple(images.shape))
        self.fault(images, len(self.shapes))
        return self.runner(images)


def install_fault(monkeypatch: pytest.MonkeyPatch, fault: Callable[[torch.Tensor, int], None]) -> list:
    """Make ``extract`` run its backends as ``StandInBackend``s with ``fault``; returns them."""
    made: list[StandInBackend] = []
    make = pipeline.make_backend

    def make_backend(*args: object) -> StandInBackend:
        made.append(StandInBackend(make(*args), fault))
        return made[-1]

    monkeypatch.setattr(pipeline, "make_backend", make_backend)
    return made


def test_extract_restores_process_wide_settings(
    monkeypatch: pytest.MonkeyPatch, small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    """For Python API callers: cuDNN's flags, and the thread counts the run sets, read the same
    after ``extract``, returned or raised."""
    fail = False

    def state() -> dict[str, object]:
        return {**tf32_state(), "torch threads": torch.get_num_threads(), "cv2 threads": cv2.getNumThreads()}

    def sets_flags(images: torch.Tensor, call: int) -> None:
        """Stands in for the torch backend on CUDA, which sets cuDNN's process-wide flags."""
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, False
        if fail:
            raise RuntimeError("device lost")

    install_fault(monkeypatch, sets_flags)
    threads = torch.get_num_threads(), cv2.getNumThreads()
    with restored_settings():  # the test's own changes do not outlive it
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True
        torch.set_num_threads(1)  # the run gives PyTorch every core and OpenCV one thread
        cv2.setNumThreads(2)
        try:
            for fail in (False, True):
                before = state()
                with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
                    extract(
                        small_images,
                        tmp_path / f"{fail}.h5",
                        run=ExtractRun(str(random_weights), backend="torch"),
                    )
                assert state() == before
        finally:
            torch.set_num_threads(threads[0])
            cv2.setNumThreads(threads[1])


def test_out_of_memory_halves_the_batch_and_fails_only_an_image_too_large_alone(
    monkeypatch: pytest.MonkeyPatch, random_weights: Path, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    small = [f"a{index}.png" for index in range(8)]
    for index, name in enumerate(small):
        write_image(root / name, 96, 64, seed=index)
    write_image(root / "z.png", 192, 128, seed=9)  # four times the pixels: never fits
    config = ExtractConfig(threshold=0.0)
    options = {"weights": str(random_weights), "device": "cpu", "backend": "torch"}
    extract(root, tmp_path / "reference.h5", config, ExtractRun(batch_size=1, **options))  # no memory limit

    def out_of_memory(images: torch.Tensor, call: int) -> None:
        """Stands in for a GPU with room for 2 images of 64 x 96: above that PyTorch's CUDA
        allocator raises torch.OutOfMemoryError."""
        if images.numel() > 2 * 64 * 96:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 GiB")

    fakes = install_fault(monkeypatch, out_of_memory)

    summary = extract(root, tmp_path / "gpu.h5", config, ExtractRun(batch_size=4, **options))

    # 4 fail, halves fit; the next batch of 4 goes by halves at once; the large image fails alone
    assert fakes[0].shapes == [(4, 1, 64, 96), (2, 1, 64, 96), (2, 1, 64, 96)] + [(2, 1, 64, 96)] * 2 + [
        (1, 1, 128, 192)
    ]
    assert summary.done == 8 and summary.exit_code == 1
    (failure,) = summary.failed
    assert failure["name"] == "z.png"
    assert failure["reason"].startswith("out of device memory at 192 x 128 px")
    assert "--resize-max 96" in failure["reason"] and "tiles" in failure["reason"]
    with h5py.File(tmp_path / "reference.h5", "r") as one, h5py.File(tmp_path / "gpu.h5", "r") as halves:
        assert sorted(halves) == small
        for name in small:
            for key in ("keypoints", "scores", "descriptors"):
                np.testing.assert_allclose(halves[name][key][()], one[name][key][()], atol=1e-3)


@pytest.mark.parametrize("stage", ["network", "postprocess"])
def test_failed_extract_leaves_no_decoding_worker_and_keeps_finished_images(
    stage: str, monkeypatch: pytest.MonkeyPatch, random_weights: Path, tmp_path: Path
) -> None:
    """An error at the second batch, in the network (a stand-in backend raising) or in the
    post-processing on the writer's thread (a stand-in raising, as a device out of memory
    there would), ends the decoding worker processes at once, although the exception, and the
    frames it holds, are still referenced (as a notebook keeps the last one); the image
    finished before it is saved."""
    root = tmp_path / "images"
    for index in range(4):
        write_image(root / f"{index}.png", seed=index)

    def device_lost(*args: object) -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            raise RuntimeError("device lost")

    calls: list[int] = []
    if stage == "network":
        install_fault(monkeypatch, device_lost)
    else:
        finish = pipeline.finish_batch
        monkeypatch.setattr(pipeline, "finish_batch", lambda *args: device_lost() or finish(*args))
    options = {"weights": str(random_weights), "device": "cpu", "backend": "torch", "batch_size": 1}
    assert multiprocessing.active_children() == []
    with pytest.raises(RuntimeError, match="device lost") as raised:
        extract(root, tmp_path / "f.h5", run=ExtractRun(num_workers=2, **options))
    assert raised.value.__traceback__ is not None
    assert multiprocessing.active_children() == []
    monkeypatch.undo()
    assert extract(root, tmp_path / "f.h5", run=ExtractRun(**options)).skipped == 1


def test_fp16_on_the_cpu_warns_with_the_faster_choices(
    random_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """PyTorch runs fp16 about 5x slower than fp32 on the CPU (README, Performance): the run
    goes on (a store made with fp16 may need finishing there) but says what is faster."""
    root = tmp_path / "images"
    write_image(root / "tiny.png", 16, 16)
    options = {"images": root, "run": ExtractRun(weights=str(random_weights), device="cpu")}
    with pytest.warns(SpExtractWarning, match=r"fp16 on the CPU.*5x slower.*bf16 or fp32") as caught:
        summary = extract(out=tmp_path / "fp16.h5", config=ExtractConfig(precision="fp16"), **options)
    assert summary.done == 1 and len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at bf16
        extract(out=tmp_path / "bf16.h5", config=ExtractConfig(precision="bf16"), **options)
    capsys.readouterr()
    with recording():  # as a command runs it: one line on stderr, recorded in its report
        summary = extract(out=tmp_path / "cli.h5", config=ExtractConfig(precision="fp16"), **options)
    assert capsys.readouterr().err == f"sp-extract: warning: {caught[0].message}\n"
    assert summary.warnings == [str(caught[0].message)]
