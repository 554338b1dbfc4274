"""Durable file writes: whole files or nothing, flushed to disk before they count, and write
errors (a full disk, say) reported with the path and the space left."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a whole file or nothing: a partial write never replaces an earlier version."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def free_space(path: str | Path) -> str:
    """The space left on the filesystem holding ``path``, for error messages."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown free space"
    return f"{free / 2**20:,.1f} MiB free there"


def write_error(what: str, path: str | Path, err: BaseException) -> str:
    """A message for a failed write: what, where, why, and how much space is left."""
    reason = getattr(err, "strerror", None) or str(err)
    return f"could not write {what} {path}: {reason} ({free_space(path)})"
