"""Atomic file writes: the file at ``path`` is always whole, old or new, whatever crash happens mid-write.

Write to a temporary file beside ``path`` (same folder, so the rename stays on one file system), flush and fsync it,
``os.replace`` it onto ``path`` (atomic on POSIX), then fsync the folder so the rename itself survives power loss.
A crash before the rename leaves only the temporary file (``.NAME.*.tmp``); the next write to ``path`` removes such
leftovers (``remove_stale_temporaries``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

logger = logging.getLogger(__name__)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted ``atomic_write(path, ...)`` left beside ``path``; returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [leftover for leftover in path.parent.glob(f"{_temporary_prefix(path)}*.tmp") if leftover.is_file()]
    for leftover in stale:
        leftover.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted write of %s", leftover, path)
    return stale


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically: ``write(file)`` fills a temporary file, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
