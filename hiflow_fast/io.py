"""File output: atomic writes that never replace an existing file unless asked, checks of
output paths made before any work, and a set of files written all-or-nothing."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch

from .errors import HiFlowInputError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = False) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then move it into place.

    Raises HiFlowInputError if `path` exists and `overwrite` is False. A failed write leaves no
    partial file behind.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise HiFlowInputError("output", path, "a path that does not exist yet (pass --overwrite to replace it)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise HiFlowInputError("output", path, f"a path in an existing folder ({directory} does not exist)")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _set_default_permissions(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target appeared meanwhile: no silent overwrite even in a race.
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=overwrite)


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, field: str = "output") -> str:
    """Refuse, before any work, an output path that cannot be written: its folder is missing
    or not writable (tested by creating and removing a file there, which also catches
    read-only mounts and /proc, even as root), it is a directory, or it exists and `overwrite`
    is False. Returns the path as a string."""
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) in ("", b""):
        raise HiFlowInputError(field, path, "a file path")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise HiFlowInputError(field, path, "a file path, not a directory")
    if os.path.lexists(path) and not overwrite:
        raise HiFlowInputError(field, path, "a path that does not exist yet (pass --overwrite to replace it)")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise HiFlowInputError(field, path, "a regular file path (this is a special file)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise HiFlowInputError(field, path, f"a path in an existing folder ({directory} does not exist)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-writable-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HiFlowInputError(field, path, f"a path in a writable folder ({directory}: {exc.strerror or exc})") from None
    return path


def check_output_paths(
    paths, *, overwrite: bool = False, field: str = "output", bytes_each: list[int] | None = None
) -> list[str]:
    """`check_output_path` for each, no path twice, and, when `bytes_each` gives an upper bound
    of each file's size, enough free space in each folder for all of them."""
    checked = [check_output_path(p, overwrite=overwrite, field=field) for p in paths]
    seen: set[str] = set()
    for path in checked:
        key = os.path.realpath(path)
        if key in seen:
            raise HiFlowInputError(field, path, "a different path for each output file")
        seen.add(key)
    if bytes_each is not None:
        needed: dict[str, int] = {}
        for path, size in zip(checked, bytes_each):
            folder = os.path.dirname(os.path.abspath(path))
            needed[folder] = needed.get(folder, 0) + size
        for folder, size in needed.items():
            stats = os.statvfs(folder)
            free = stats.f_bavail * stats.f_frsize
            if free < size:
                path = next(p for p in checked if os.path.dirname(os.path.abspath(p)) == folder)
                raise HiFlowInputError(
                    field, path, f"a folder with room for the run's files (up to {size} bytes; {folder} has {free} free)"
                )
    return checked


class OutputSet:
    """A run's output files, written all-or-nothing.

    `write(path, fn)` calls fn(tmp) on a hidden temporary file beside `path`; `commit()` moves
    every file into place, and only then. On any failure (or Ctrl-C) before or during the commit
    the temporaries are removed, the files already moved are removed again and any file an
    `overwrite` replaced is put back, so a failed run leaves the folder as it found it and an
    identical rerun is never blocked by leftovers. Use as a context manager: leaving the block
    without `commit()` discards everything."""

    def __init__(self, *, overwrite: bool = False):
        self.overwrite = overwrite
        self._pending: list[tuple[str, str]] = []  # (temporary, final path)
        self.committed: list[str] = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()

    def write(self, path: str | os.PathLike, write: Callable[[str], None]) -> None:
        path = os.fspath(path)
        if os.path.exists(path) and not self.overwrite:
            raise HiFlowInputError("output", path, "a path that does not exist yet (pass --overwrite to replace it)")
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
        os.close(fd)
        self._pending.append((tmp, path))
        write(tmp)
        _set_default_permissions(tmp)

    def commit(self) -> list[str]:
        moved: list[tuple[str, str | None]] = []  # (final path, backup of what it replaced)
        try:
            for tmp, path in self._pending:
                backup = None
                if os.path.lexists(path):
                    if not self.overwrite:
                        raise HiFlowInputError("output", path, "a path that does not exist yet (pass --overwrite to replace it)")
                    backup = tmp + ".old"
                    os.replace(path, backup)
                try:
                    # link() fails if the target appeared meanwhile: no silent overwrite in a race.
                    os.link(tmp, path)
                except BaseException:
                    if backup is not None:
                        os.replace(backup, path)
                    raise
                moved.append((path, backup))
        except BaseException:
            for path, backup in reversed(moved):
                _remove(path)
                if backup is not None:
                    os.replace(backup, path)
            raise
        for path, backup in moved:
            if backup is not None:
                _remove(backup)
        self.discard()
        self.committed = [path for path, _ in moved]
        return self.committed

    def discard(self) -> None:
        for tmp, _ in self._pending:
            _remove(tmp)
        self._pending = []


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _set_default_permissions(path: str) -> None:
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
