"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def user_cache_dir() -> Path:
    """bnsuite's per-user cache directory: `$XDG_CACHE_HOME/bnsuite`, else `~/.cache/bnsuite`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnsuite"


def write_atomically(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary file in the same directory.

    The data is flushed to disk before `os.replace` renames it into place, so a
    process killed at any instant leaves either the previous content or the
    complete new one. Concurrent writers of different files never collide
    because each temporary name is unique.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        os.chmod(partial_name, 0o644)  # mkstemp's 0600 would make results unreadable to others
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial_name, path)
    except BaseException:
        Path(partial_name).unlink(missing_ok=True)
        raise
