"""File output: atomic writes that never replace an existing file unless asked."""

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
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
