"""Files and folders that readers never see half-written: each is written under a name of its
writer's own and renamed into place (a rename within one folder is atomic), so a reader sees the
old one or the whole new one, two writers never write the same file, and an interrupted writer
leaves only a hidden leftover."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def private_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer uses; it keeps ``path``'s suffix (writers
    such as ``numpy.savez`` add theirs when it is missing)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def write_with(path: Path, write: Callable[[Path], None]) -> None:
    """``write(a private path)``, then that file renamed to ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_name(path)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, data: str | bytes) -> None:
    """``path`` holds ``data`` (text or bytes), all of it or, to a reader meanwhile, the old file."""
    write_with(path, lambda tmp: tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data))


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` to fill; renamed to ``out`` when the block ends, removed
    (with whatever it holds) when the block raises or is interrupted."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
