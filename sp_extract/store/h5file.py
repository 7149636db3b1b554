"""HDF5 files through raw file descriptors: positioned reads for h5py's file-object driver, and
the write-through file that keeps an I/O error (disk full) from HDF5, which could not close the
file after it, and raises it once HDF5 has closed the file."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py


class DescriptorFile(io.RawIOBase):
    """A file for h5py's file-object driver: positioned reads (``pread``) on a descriptor."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = 0

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size()}[whence]
        self._position = start + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self._fd, len(view), self._position)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class WriteThrough(DescriptorFile):
    """The file HDF5 writes a part or a new store through, which never reports a failure to it.

    An HDF5 library that saw a write fail cannot close that file any more and crashes the
    process at exit. So the first I/O error (disk full, file size limit) is kept here, HDF5
    carries on into nothing, and ``commit`` raises the error once HDF5 has closed the file;
    the half-written temporary is then deleted by the caller.
    """

    def __init__(self, path: Path, create: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        super().__init__(os.open(path, flags, 0o644))
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], self._position + done)
            except OSError as error:
                self.error = error
        self._position += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as error:
                self.error = error
        return size

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        """fsync and close; raises the first error met on the way."""
        try:
            if self.error is None:
                os.fsync(self._fd)
        except OSError as error:
            self.error = error
        finally:
            self.close()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def hdf5_writing(path: Path, create: bool) -> Iterator[h5py.File]:
    """``h5py.File`` writing ``path`` through ``WriteThrough``; durable (fsynced) on exit."""
    target = WriteThrough(path, create)
    try:
        with h5py.File(target, "w" if create else "r+") as h5:
            yield h5
    finally:
        target.commit()
