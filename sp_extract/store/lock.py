"""The store's writer lock: one writer at a time, an OS-level lock on ``STORE.lock`` that the
kernel releases when its holder dies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from ..errors import StoreError
from .failures import describe_error


class StoreLock:
    """Exclusive lock on ``STORE.lock``; the file holds the holder's pid.

    A POSIX record lock (``lockf``): the kernel releases it the moment its process dies, and,
    unlike ``flock``, forked children (decoding workers) do not inherit it, so a killed run
    whose workers are still winding down does not block the next one. POSIX locks do not
    exclude the process holding them, so a second writer in the same process is refused here.
    """

    _held: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store.with_name(store.name + ".lock")
        self.fd: int | None = None
        self._key: tuple[int, int] | None = None

    def _refuse(self, holder: str) -> StoreError:
        return StoreError(
            f"{self.store}: another sp-extract process (pid {holder or 'unknown'}) is writing this "
            "store; wait for it to finish"
        )

    def acquire(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) in self._held:  # never open it: closing would unlock it
                raise self._refuse(str(os.getpid()))
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise StoreError(
                    f"{self.store}: cannot write in {self.store.parent} ({describe_error(error)})"
                ) from error
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    raise StoreError(f"{self.path}: cannot lock ({describe_error(error)})") from error
                raise self._refuse(holder) from None
            info = os.fstat(fd)
            try:  # the file may have been unlinked by its previous holder between open and lock
                same = info.st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as error:  # disk full, quota: give the lock up, leak no descriptor
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)
            raise StoreError(
                f"{self.store}: cannot write the lock file {self.path} ({describe_error(error)}); "
                "the store was not changed"
            ) from error
        self.fd, self._key = fd, (info.st_dev, info.st_ino)
        self._held.add(self._key)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self._held.discard(self._key)
        self.fd = self._key = None
