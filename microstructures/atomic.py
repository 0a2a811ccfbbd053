"""Atomic file output: write to a temporary file in the target's directory, then rename.

A reader never sees a half-written file, and a failed write leaves nothing behind (an
existing file at the target keeps its old content).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional

from .cell import CellError


def unwritable(path) -> Optional[str]:
    """Why ``path`` cannot be written as a file (a directory, a missing or read-only
    directory), or None: for checks before long work whose output a typo would lose."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or path.endswith(os.sep):
        return f"cannot write {path}: it is a directory"
    if not os.path.isdir(directory):
        return f"cannot write {path}: directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot write {path}: directory {directory} is not writable"
    return None


def chmod_like_open(path) -> None:
    """Give ``path`` (a temporary file from mkstemp, mode 0600) the mode an ordinary open()
    would: 0666 less the umask, so that files shared on a cluster are readable as others are."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_output(path) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(directory):
        raise CellError(unwritable(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise CellError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield tmp
        chmod_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
