"""Slide paths a client may name: under the configured roots, checked where the file is opened.

A path is checked twice. At SUBMIT, as text: absolute, no NUL byte, every component within
NAME_MAX, resolvable (a symlink loop is refused, not raised) and under a root. At scoring time,
where it matters: each file is opened with O_NOFOLLOW, the real path of the open descriptor
(``/proc/self/fd/N``) must lie under a root, and its device and inode must be those of that
real path. The scorer then reads through the descriptor, so a symlink inside a folder, or a file
swapped for a symlink between SUBMIT and scoring, cannot make it read anything outside the roots.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterator

from cytoedge.runtime.errors import InputImageError

NAME_MAX = 255  # bytes per path component (Linux, macOS, Windows NTFS)
FD_LINKS = Path("/proc/self/fd")


class PathRefused(InputImageError):
    """A slide path that is malformed, outside the roots, or not a regular file or folder."""


def under_roots(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_submitted_path(raw: str, roots: list[Path]) -> Path:
    """The resolved path of a SUBMIT, or PathRefused saying why (the message quotes ``raw``)."""
    if "\x00" in raw:
        raise PathRefused(f"{raw!r} holds a NUL byte")
    path = Path(raw)
    if not path.is_absolute():
        raise PathRefused(f"{raw!r} is not an absolute path")
    long = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        raise PathRefused(f"{raw!r}: component {long[:40]!r}... is {len(os.fsencode(long))} bytes; "
                          f"the limit is {NAME_MAX}")
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise PathRefused(f"{raw!r} does not exist") from None
    except RuntimeError as e:  # Python < 3.13 raises RuntimeError("Symlink loop from ...")
        raise PathRefused(f"{raw!r} cannot be resolved ({e})") from None
    except OSError as e:  # ELOOP, ENAMETOOLONG, EACCES, ...
        raise PathRefused(f"{raw!r} cannot be resolved ({os.strerror(e.errno) if e.errno else e})") from None
    if not under_roots(resolved, roots):
        raise PathRefused(f"{raw!r} is outside the configured roots {[str(r) for r in roots]}")
    return resolved


class RootGuard:
    """Opens slide files for reading only if they lie under ``roots`` (see the module docstring)."""

    def __init__(self, roots: list[Path]):
        self.roots = [Path(r) for r in roots]

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[str]:
        """Yields a path the readers can open that names exactly the checked file (a descriptor
        link on Linux), valid until the block ends; PathRefused if ``path`` is a symlink, leads
        outside the roots, or is not a regular file."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PathRefused(f"{path}: is a symlink; slide files are opened without following links") from None
            raise PathRefused(f"{path}: cannot be opened ({os.strerror(e.errno) if e.errno else e})") from None
        try:
            yield self._checked(fd, Path(path))
        finally:
            os.close(fd)

    def _checked(self, fd: int, path: Path) -> str:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PathRefused(f"{path}: not a regular file")
            linked = FD_LINKS.is_dir()
            real = Path(os.readlink(FD_LINKS / str(fd))) if linked else Path(os.path.realpath(path))
            if not under_roots(real, self.roots):
                raise PathRefused(f"{path}: is {real}, outside the configured roots {[str(r) for r in self.roots]}")
            named = os.stat(real)
        except OSError as e:
            raise PathRefused(f"{path}: cannot be checked ({e})") from None
        if (named.st_dev, named.st_ino) != (info.st_dev, info.st_ino):
            raise PathRefused(f"{path}: changed while it was being opened")
        return str(FD_LINKS / str(fd)) if linked else str(real)
