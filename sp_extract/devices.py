"""Device specifics shared by extraction and matching: the few CUDA and Apple MPS rules, in one
place, so that every other line runs the same on the CPU.

- ``resolve_device``: the ``--device`` choice (``auto``: CUDA, then MPS, then the CPU).
- ``device_scope``: a run's device made current (``current_device``: a CUDA call that names no
  device acts on it, not on GPU 0), and PyTorch's process-wide settings restored when it ends.
- ``to_device``: host to device; asynchronous only from pinned memory to CUDA.
- ``copy_to_host``: device to host; on CUDA asynchronous, guarded by an event recorded on the
  stream that runs the copy (that of the tensors' own device).
- ``for_other_thread``: dense outputs another thread may post-process: on MPS, on the CPU.
- ``release_cached_memory``: after running out of device memory.
- ``ShapeTuning``: cuDNN benchmark mode for the batch shapes that repeat only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; else ``cpu``, ``cuda[:N]``, ``mps``."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise ConfigError(f"--device {spec}: not a device (auto, cpu, cuda, cuda:N, mps)") from error
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ConfigError(f"--device {spec}: not available on this machine")
    return device


def _saved_settings() -> list[tuple[Any, str, Any]]:
    """(owner, name, value) of the process-wide PyTorch flags a run may change, in the order
    that restores them: cuDNN benchmark mode; cuDNN's TF32 flag through the legacy API, if it
    can be read (it raises once the per-backend API has set conflicting values); then the
    per-backend float32 precisions (PyTorch >= 2.9), which the legacy setter changes too."""
    cudnn = torch.backends.cudnn
    saved = [(cudnn, "benchmark", cudnn.benchmark)]
    with contextlib.suppress(RuntimeError):
        saved.append((cudnn, "allow_tf32", cudnn.allow_tf32))
    if hasattr(cudnn, "fp32_precision"):
        saved += [(owner, "fp32_precision", owner.fp32_precision) for owner in (cudnn, cudnn.conv, cudnn.rnn)]
    return saved


@contextlib.contextmanager
def restored_settings() -> Iterator[None]:
    """Run the block, then put PyTorch's process-wide cuDNN flags back as they were before it."""
    saved = _saved_settings()
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` as CUDA's current device for the block, on this thread, if it is a CUDA device
    (else nothing): CUDA calls that name no device then act on it, not on GPU 0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def device_scope(device: torch.device) -> Iterator[None]:
    """Run the block with ``device`` current (``current_device``) and PyTorch's process-wide
    flags restored afterwards, for Python API callers."""
    with restored_settings(), current_device(device):
        yield


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``images`` on ``device``. Asynchronous only from pinned memory to CUDA, where the caching
    host allocator keeps the pinned source until the copy is done; elsewhere blocking: on MPS
    an asynchronous copy from pageable memory freed after the call can read freed memory."""
    asynchronous = device.type == "cuda" and images.device.type == "cpu" and images.is_pinned()
    return images.to(device, non_blocking=asynchronous)


@dataclass
class HostCopy:
    """Tensors being copied to the host; ``wait`` returns them once the copy is complete."""

    tensors: list[torch.Tensor]
    done: Any = None  # a torch.cuda.Event on CUDA, None when the copies are already complete

    def wait(self) -> list[torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.tensors


def copy_to_host(tensors: Sequence[torch.Tensor]) -> HostCopy:
    """Start copying ``tensors`` (all on one device) to the host. On CUDA the copies are queued
    on the current stream of the tensors' own device, under a guard for that device (so no
    context is made on GPU 0), and the event that ``wait`` synchronises on is recorded on that
    same stream; on the CPU and MPS they are blocking (MPS: see ``to_device``)."""
    device = tensors[0].device
    if device.type != "cuda":
        return HostCopy([tensor.cpu() for tensor in tensors])
    with current_device(device):
        copies = [tensor.to("cpu", non_blocking=True) for tensor in tensors]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
    return HostCopy(copies, done)


def for_other_thread(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``tensors`` made safe to use from another thread than this one: on MPS copied to the
    CPU here (blocking), since PyTorch's MPS work is not safe from two threads at once; CUDA
    and CPU tensors as they are (CUDA orders the work of all threads on a device's stream)."""
    if tensors and tensors[0].device.type == "mps":
        return tuple(tensor.cpu() for tensor in tensors)
    return tensors


def release_cached_memory() -> None:
    """Hand the device memory PyTorch's allocators keep cached back (after running out of it),
    on CUDA only if it was used (no context is made for it)."""
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


class ShapeTuning:
    """cuDNN benchmark mode for a batch shape only once it repeats.

    Benchmark mode times every convolution algorithm at each new input shape: worth it for
    shapes that come back (a folder of one camera), pure cost on folders where every photo has
    its own size. ``benchmark(shape)`` is False at a shape's first batch (cuDNN's heuristics
    choose) and True from its second (tuned once, then cached by cuDNN).
    """

    def __init__(self) -> None:
        self.seen: set[tuple[int, ...]] = set()

    def benchmark(self, shape: Sequence[int]) -> bool:
        key = tuple(shape)
        repeated = key in self.seen
        self.seen.add(key)
        return repeated
