"""Small file-system helpers shared by the stores that promise durability
(the maildir store and the queue spool)."""

from __future__ import annotations

import os

#: Flags for os.open that are missing on some platforms (0 there).
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def fsync_dir(path: str) -> None:
    """fsync the directory ``path``, making its entries (a new link, a
    rename in or out, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
