"""Writing directories and files atomically: readers see the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _beside(target: Path, tag: str) -> Path:
    """A hidden name in ``target``'s folder (the same file system, so a rename is atomic), unique to this
    process and call."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty directory beside ``target`` to write into; when the block ends normally it is renamed
    to ``target``.

    An existing ``target`` is replaced only then: it is moved aside, the new directory moved in, and the old
    one deleted. When the block raises (or the process dies), ``target`` is left as it was and the
    temporary directory is removed (or, after a crash, left as a hidden ``.<name>.tmp-*`` folder).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = _beside(target, "old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous version back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file beside ``target`` to write into; when the block ends normally it is flushed to
    disk and renamed over ``target``. When the block raises, ``target`` is untouched and the file removed."""
    target = Path(target)
    tmp = _beside(target, "tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
