"""Writing files and directories so that a crash (even ``kill -9``) leaves the old version
or the new one, never half of one.

- :func:`write_bytes` / :func:`write_text` / :func:`write_json`: write beside the target, then ``os.replace``.
- :func:`staged_dir`: build a directory beside its destination; on success it takes the
  destination's place in one step (Linux ``renameat2(RENAME_EXCHANGE)`` swaps the two
  directories atomically, then the old one is removed); on an exception the staging
  directory is removed and the destination is untouched. One writer per destination: a
  new stage first removes what a killed writer left.

Where the exchange is not available, the old directory is first renamed to
``DEST.previous`` and the new one renamed into place; :func:`recover` (called by every
reader and writer of such a directory) puts ``DEST.previous`` back if a crash fell between
the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from typing import Iterator

__all__ = ["recover", "staged_dir", "write_bytes", "write_json", "write_text"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file of its own beside it, so that
    writers running side by side never share one)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, data) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=1))


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def recover(dest: str) -> None:
    """Undo a replacement a crash interrupted: ``DEST.previous`` without ``DEST`` goes back."""
    previous = dest.rstrip(os.sep) + ".previous"
    if os.path.isdir(previous) and not os.path.exists(dest):
        os.rename(previous, dest)


def _replace_dir(staged: str, dest: str) -> None:
    if os.path.isdir(dest) and _exchange(staged, dest):
        shutil.rmtree(staged, ignore_errors=True)  # now the old directory
        return
    previous = dest.rstrip(os.sep) + ".previous"
    if os.path.isdir(dest):
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(dest, previous)
    os.rename(staged, dest)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(dest: str) -> Iterator[str]:
    """A fresh directory beside ``dest`` to write into; it becomes ``dest`` when the block
    ends without an exception (see the module docstring)."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ValueError(f"{dest} is a file, not a directory; give a directory to save into")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    recover(dest)
    prefix = f".{os.path.basename(dest)}.staged-"
    for name in os.listdir(parent):  # what a killed writer of dest left (one writer per destination)
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    staged = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _replace_dir(staged, dest)
