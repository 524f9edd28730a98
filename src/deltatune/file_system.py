"""The file system's primitives that the atomic writes (`atomic.py`) rest on: exchanging two paths in one
step, and fsync of a file or a folder's entries.

`exchange(first, second)` is Linux's `renameat2(RENAME_EXCHANGE)` (ext4, xfs, btrfs, tmpfs, ...), reached
through the C library; it says False where the system or the file system cannot (other systems, NFS), so
that the caller falls back to two renames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

AT_FDCWD = -100
"""`renameat2`'s directory descriptor for paths relative to the working directory."""
RENAME_EXCHANGE = 2
"""`renameat2`'s flag: exchange the two paths."""


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first))


@cache
def _renameat2() -> Any:
    """The C library's `renameat2` (Linux, glibc 2.28+ or musl), or None."""
    if sys.platform != "linux":
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def sync_tree(path: Path) -> None:
    """fsync a file, or a folder with everything in it."""
    if path.is_dir():
        for child in path.iterdir():
            sync_tree(child)
        sync_folder(path)
    else:
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def sync_folder(path: Path) -> None:
    """fsync a folder's entries (POSIX; Windows cannot open a folder)."""
    if os.name == "posix":
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
