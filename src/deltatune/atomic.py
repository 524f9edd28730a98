"""Writes that never leave a mix of two saves, and leave nothing behind when killed.

`replace_folder(folder, writers)` replaces a whole folder (an adapter save), so a reader sees the old
folder or the new one, never a mix. With `parent` the folder's parent (POSIX):

1. Lock `parent` itself (`flock` on the directory, exclusive; where the file system refuses locks on
   directories, as NFS does, an empty `parent/.deltatune.lock` is locked instead and stays). Every
   write that stages in a directory holds that directory's lock, so two processes saving to one folder run one after
   the other and never mix their files (the later one wins whole); and while the lock is held, every
   staging entry in `parent` (`.<name>.deltatune-<16 hex digits>.partial`: a name no other program
   makes, so another tool's `.download.partial` stays) is a killed write's and is removed, and a swap
   that a kill interrupted is finished (step 4).
2. Stage: each writer writes its file (or folder) into a new staging folder in `parent`; each is
   fsynced. First, an entry of the old folder that a writer would replace and that `replaced(entry)`
   does not claim (a user's folder with an adapter's name) fails the save: a save never removes what
   no save wrote.
3. Carry over: the entries of the old folder that no writer wrote and that `replaced(entry)` does not
   claim (a README, a model beside the adapter) are hard-linked into the staging folder (copied where
   a link fails). The old folder is never written to.
4. Swap: `renameat2(RENAME_EXCHANGE)` (`file_system.exchange`) exchanges the folder and the staging
   folder in one step (Linux: ext4, xfs, btrfs, tmpfs, ...), so at every instant the path holds a
   complete folder; the old one, now under the staging name, is then removed. Where the file system
   cannot exchange (NFS, macOS) the old folder is renamed to `.<name>.deltatune-old` and the staging
   folder into place; between the two renames the path is absent. A kill there leaves the old folder
   complete under that name: the next save puts it back first, and `load` names it in its error.

`staged_folder(folder)` is the same replacement for a block that writes the staging folder itself (a
merged model, whose files a library's `save_pretrained` writes); `restore_interrupted(folder)` finishes an
interrupted swap at once (`deltatune merge` calls it before it checks OUT, and says what it put back).

So a kill at any instant leaves the old folder or the new one at the path, and staging that the next
save into that parent removes. Readers take no lock: `folder_version` changes whenever the folder is
replaced, so a reader compares it before and after reading and reads again if it changed. A process
whose working directory is inside the folder is moved to the new one; other processes that hold the
old folder open (a log file inside it) keep the old one: so a save folder is a folder of its own,
never a run's output folder.

Why this design: the folder keeps its plain layout, which peft, the Hub and `cp -r` read as it is
(a symlink to a generation folder would not); the exchange leaves no instant without a folder (which
renaming the old folder aside first does, so that is only the fallback); and readers need no lock, so
a read-only folder, or one another user wrote, loads as well.

`write_files(folder, writers)` adds or replaces files in a folder that stays (a run's output folder,
a checkpoint): under the folder's own lock, each file is written in full to a staging file in
the folder (same file system, also on a mount point), then all are renamed into place in the order
given, the file that marks a complete write last (a kill between two renames leaves new files beside
old ones, so the caller's last file must tell a complete write); staging of killed writes there goes
at the next one.

Helper names use an entry's name cut to `STEM_BYTES` (with a digest when cut), so every name that the
file system takes can be saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import file_system
from .errors import AdapterFileError

try:
    import fcntl
except ImportError:  # Windows: no flock, so saves into one parent are not serialized there
    fcntl = None

Writer = Callable[[str], None]

LOCK_FILE = ".deltatune.lock"
STEM_BYTES = 200
STAGING = re.compile(r"\..+\.deltatune-[0-9a-f]{16}\.partial")
ASIDE_SUFFIX = ".deltatune-old"


def replace_folder(
    folder: Path, writers: dict[str, Writer], replaced: Callable[[Path], bool] = lambda entry: False
) -> None:
    """Replace `folder`, in one step, by a folder holding what `writers` write (`{entry name:
    writer(path)}`, each writing one file or folder) and the old folder's other entries, except those
    that `replaced(entry)` claims for this save. An error before the swap leaves the old folder as it was."""
    with staged_folder(folder, replaced, list(writers)) as staging:
        for name, write in writers.items():
            write(str(staging / name))


@contextlib.contextmanager
def staged_folder(
    folder: Path, replaced: Callable[[Path], bool] = lambda entry: False, names: Iterable[str] = ()
) -> Iterator[Path]:
    """A new staging folder beside `folder` for the block to write into (`names`: the entries it will write,
    checked first as `replace_folder` checks its writers'). When the block ends without error the staging
    folder, with the old folder's entries that it lacks and `replaced` does not claim, replaces `folder` in
    one step; else it is removed and `folder` stays as it was. `replaced=lambda entry: True` replaces the
    old folder whole (`deltatune merge --overwrite`)."""
    with _errors_said(folder):
        real = _real_folder(Path(folder))
        with _locked(real.parent):
            _remove_staging(real.parent)
            _finish_interrupted_swap(real)
            if real.is_dir():
                _check_only_saves_replaced(real, names, replaced)
            staging = _new_staging(real.parent, real.name)
            try:
                os.mkdir(staging)
                yield staging
                for entry in staging.iterdir():
                    file_system.sync_tree(entry)
                if real.is_dir():
                    _carry_over(real, staging, replaced)
                    shutil.copymode(real, staging)
                file_system.sync_folder(staging)
                with _working_directory_kept(real):
                    _swap(real, staging)
                file_system.sync_folder(real.parent)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


def restore_interrupted(folder: Path) -> Path | None:
    """Finish a replacement of `folder` that a kill stopped between its two renames (step 4's fallback): where
    the path is absent, put the old folder back and return where it lay; where the new one is in place, drop
    the old. None where there was nothing to finish."""
    real = Path(os.path.realpath(folder))
    if not _aside(real).is_dir():
        return None
    with _errors_said(folder), _locked(real.parent):
        return _finish_interrupted_swap(real)


def write_files(folder: Path, writers: dict[str, Writer]) -> None:
    """Write `{file name: writer(temporary path)}` into `folder`, all or (until the renames) nothing;
    other entries of the folder stay. Files are renamed in the order given: put the file that marks a
    complete write last."""
    folder = Path(folder)
    with _errors_said(folder):
        _check_not_a_file(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            _remove_staging(folder)
            staged: dict[str, Path] = {}
            try:
                for name, write in writers.items():
                    staged[name] = _new_staging(folder, name)
                    write(str(staged[name]))
                    file_system.sync_tree(staged[name])
                for name, path in staged.items():
                    os.replace(path, folder / name)
                file_system.sync_folder(folder)
            finally:
                for path in staged.values():
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)


def folder_writer(writers: dict[str, Writer]) -> Writer:
    """A writer of a folder holding `{file name: writer}`."""

    def write(path: str) -> None:
        os.mkdir(path)
        for name, write_file in writers.items():
            write_file(os.path.join(path, name))

    return write


def json_writer(data: dict[str, Any]) -> Writer:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, sort_keys=True)
            file.write("\n")

    return write


def safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Writer:
    """safetensors of detached, contiguous CPU copies (no pickling, no shared storage)."""
    plain = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
    return lambda path: save_file(plain, path, metadata=metadata)


def folder_version(path: Path) -> tuple[int, int, int] | None:
    """Changes whenever a save replaces the folder at `path` or an entry in it; None where it is absent."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def interrupted_save(folder: Path) -> Path | None:
    """Where the old `folder` lies if a save killed between its two renames left the path absent."""
    real = Path(os.path.realpath(folder))
    aside = _aside(real)
    return aside if not real.exists() and aside.is_dir() else None


def is_helper(name: str) -> bool:
    """Whether an entry name is one of the lock, staging and aside entries that saves create."""
    return name == LOCK_FILE or bool(STAGING.fullmatch(name)) or (name.startswith(".") and name.endswith(ASIDE_SUFFIX))


# ----------------------------------------------------------------------------- the steps
def _real_folder(folder: Path) -> Path:
    _check_not_a_file(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(folder))
    if real == real.parent or os.path.ismount(real):
        raise AdapterFileError(
            f"{folder} is a mount point, which a save cannot replace as a whole; save into a folder inside it"
        )
    return real


def _check_not_a_file(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise AdapterFileError(f"{folder} is a file; pass a folder path to save into")


@contextlib.contextmanager
def _errors_said(folder: Path) -> Iterator[None]:
    """An error of the file system (disk full, no permission) as one line naming the folder."""
    try:
        yield
    except OSError as error:
        raise AdapterFileError(
            f"cannot save {folder}: {error}; check that the disk has space and the folder is writable"
        ) from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the exclusive lock of the writes that stage in `directory` (released when the descriptor
    closes, or the process dies)."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:  # no locks on directories here (NFS): lock a file in it instead
            os.close(descriptor)
            descriptor = _open_lock_file(directory / LOCK_FILE)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _open_lock_file(path: Path) -> int:
    """Opened for writing where allowed (NFS needs that for an exclusive lock), else read-only (a lock
    file another user created, in a shared folder such as /tmp)."""
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _remove_staging(directory: Path) -> None:
    """Under the lock of `directory`: remove the staging entries that killed writes left in it."""
    for entry in directory.iterdir():
        if STAGING.fullmatch(entry.name) and not entry.is_symlink():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _finish_interrupted_swap(folder: Path) -> Path | None:
    """A kill between the two renames of a swap without exchange: put the old folder back (returning where
    it lay), or, if the new one is in place, drop the old."""
    aside = _aside(folder)
    if aside.is_dir():
        if not folder.exists():
            os.rename(aside, folder)
            return aside
        shutil.rmtree(aside, ignore_errors=True)
    return None


def _new_staging(directory: Path, name: str) -> Path:
    """A free staging name for entry `name` in `directory` (the entry is made by the caller: a folder
    made with `os.mkdir` gets the usual permissions, where mkdtemp would give 0o700)."""
    while True:
        staging = directory / f".{_stem(name)}.deltatune-{secrets.token_hex(8)}.partial"
        if not os.path.lexists(staging):
            return staging


def _check_only_saves_replaced(old: Path, names: Iterable[str], replaced: Callable[[Path], bool]) -> None:
    """Refuse, before anything is written, a save that would write entries `names` over an entry of `old`
    that no save wrote (a user's folder or file with an adapter's name)."""
    for name in names:
        entry = old / name
        if os.path.lexists(entry) and not replaced(entry):
            raise AdapterFileError(
                f"{entry} is not an adapter a save wrote, and this save would replace it; move it out of {old}, or "
                "save the adapters under other names or into another folder"
            )


def _carry_over(old: Path, staging: Path, replaced: Callable[[Path], bool]) -> None:
    """Hard-link into `staging` the entries of `old` that the save neither wrote nor replaces."""
    for entry in old.iterdir():
        target = staging / entry.name
        if os.path.lexists(target) or is_helper(entry.name) or replaced(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _swap(folder: Path, staging: Path) -> None:
    if not folder.exists():
        os.rename(staging, folder)
    elif not file_system.exchange(folder, staging):
        aside = _aside(folder)
        os.rename(folder, aside)
        os.rename(staging, folder)
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _working_directory_kept(folder: Path) -> Iterator[None]:
    """The swap moves the old folder away: a working directory inside it follows to the new one."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = None
    yield
    if cwd is not None and (cwd == str(folder) or cwd.startswith(str(folder) + os.sep)) and os.path.isdir(cwd):
        os.chdir(cwd)


def _aside(folder: Path) -> Path:
    return folder.parent / f".{_stem(folder.name)}{ASIDE_SUFFIX}"


def _stem(name: str) -> str:
    """`name`, cut (with a digest of the whole) where helper names would pass 255 bytes."""
    raw = os.fsencode(name)
    if len(raw) <= STEM_BYTES:
        return name
    return os.fsdecode(raw[: STEM_BYTES - 17]) + "~" + hashlib.sha256(raw).hexdigest()[:16]
