"""Atomic writes: a file or folder appears under its final name only once it is complete.

Everything is written under a temporary name in the destination's folder and renamed into place
(``os.replace`` is atomic within a filesystem), so a killed process leaves the old version or the new
one, never half of one. Temporary names start with a dot and end in ``.tmp`` (plus ``suffix``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def create_private(path: Path, data: bytes) -> None:
    """Write a new file readable by its owner only: mode 0600 from creation, never widened.

    Raises FileExistsError when ``path`` exists (two processes racing to create it: one wins)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside ``path`` for a writer that creates the file or folder itself
    (``model.save``, ``tf.saved_model.save``, a ``TFRecordWriter``); on success it replaces ``path``
    (a folder there is removed first), on an exception it is removed. ``suffix`` ends the temporary
    name, for writers that insist on an extension (``.keras``)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp{suffix}"
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():  # os.replace cannot replace a non-empty folder
        shutil.rmtree(path)
    os.replace(tmp, path)


def atomic_write_bytes(path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; ``private`` creates it mode 0600 from the start."""
    with atomic_path(path) as tmp:
        if private:
            create_private(tmp, data)
        else:
            tmp.write_bytes(data)


def atomic_write_text(path, text: str, *, private: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``private`` as in :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), private=private)


def atomic_write_json(path, obj, *, indent: int | None = 1, **kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``kwargs`` go to ``json.dumps``)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs))
