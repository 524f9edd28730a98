"""One run at a time in an output folder: two terminals running the same config would interleave their
checkpoints, adapters and metrics in one `output_dir`.

Each command that writes a run's folder (`deltatune train`, `compare`, `demo`) holds `LOCK_FILE` there
from its start, before anything is loaded or written, until it ends. The lock is an exclusive `flock` on
that file, which holds the holder's process id:

- a second run refuses at its start, in one line naming the folder and the holder's pid;
- the kernel ends the lock with its process, so a run stopped by Ctrl-C (which removes the file on the
  way out), killed or crashed never leaves the folder locked: a later run finds the file of a pid whose
  lock is gone, says so in a warning, and takes it over (no guess from the pid, which the system may have
  given to another process since);
- in a distributed run only the main rank takes it (the ranks of one run share their folder);
- a process that holds a folder's lock takes it again freely (the demo and `deltatune train` reach the
  trainer's own lock already holding it).

Where `fcntl` does not exist (Windows) no lock is taken. A network file system without `flock` support
refuses the lock with the system's reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputFolderError
from .outputs import check_writable

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

LOCK_FILE = ".deltatune-lock"
"""The lock file in an output folder: the holder's pid, under an exclusive `flock` while it runs."""

logger = logging.getLogger("deltatune")
_held: dict[Path, int] = {}
"""The folders (resolved) this process holds the lock of → how many `output_lock` blocks hold it."""


@contextlib.contextmanager
def output_lock(folder: Path, main: bool = True) -> Iterator[None]:
    """Hold `folder`'s lock inside (see the module); `main`: whether this process takes it (the main rank)."""
    if fcntl is None or not main:
        yield
        return
    key = Path(os.path.abspath(folder))
    descriptor = None if key in _held else _take(key)
    _held[key] = _held.get(key, 0) + 1
    try:
        yield
    finally:
        _held[key] -= 1
        if not _held[key]:
            del _held[key]
            if descriptor is not None:
                _release(key, descriptor)


def _take(folder: Path) -> int:
    """Lock `folder`'s lock file, taking over one a process that is gone left; returns its descriptor."""
    check_writable(folder)  # created, or refused in one line (a file, read-only) before the lock is tried
    path = folder / LOCK_FILE
    while True:
        try:  # never through a link
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            raise OutputFolderError(
                f"output_dir {folder}: cannot open {path} ({error.strerror or error}); remove it, or give another "
                "output_dir"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise OutputFolderError(
                f"output_dir {folder} is in use by another run (pid {holder}); wait for it to end, or give "
                "another output_dir"
            ) from None
        except OSError as error:
            os.close(descriptor)
            raise OutputFolderError(
                f"output_dir {folder}: cannot lock {path} ({error.strerror or error}); give a folder on a local disk"
            ) from None
        if _same_file(descriptor, path):  # not a file its last holder removed between our open and our lock
            break
        os.close(descriptor)
    previous = _holder(descriptor)
    if previous != "unknown":
        logger.warning("%s was left by a run (pid %s) that is gone without removing it: taking it over", path, previous)
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode("ascii"), 0)
    return descriptor


def _release(folder: Path, descriptor: int) -> None:
    """Remove the lock file, then end the lock (in that order: a run waiting on it finds it gone and retries)."""
    with contextlib.suppress(OSError):
        os.unlink(folder / LOCK_FILE)
    os.close(descriptor)


def _holder(descriptor: int) -> str:
    """The pid a lock file holds, "unknown" where it holds none."""
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False
