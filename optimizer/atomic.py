"""Writing files and folders so that a reader sees the old version or the new one, never a part.

Everything mergeopt leaves on disk for later runs (golden data, measured study data, exported
models, reports, the zoo, analyses) is assembled under a temporary name beside its destination
and renamed into place at the end: a crash, a full disk or a Ctrl-C leaves the previous version
or nothing, never a half-written file that looks valid to the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["building_dir", "replace_dir", "write_file", "write_text"]


def _umask() -> int:
    """The process's umask; read from /proc where it can be, since setting it to read it is not
    thread-safe (a file another thread makes meanwhile would get no mask at all)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Make ``path`` with ``write(tmp)`` on a temporary file beside it, then rename it into place.

    The file gets the modes the user's umask gives new files (``mkstemp`` makes them private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8, flushed to disk before the rename)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write_file(path, write)


def replace_dir(new: Path, out: Path, *, umask_modes: bool = False) -> None:
    """Put the folder ``new`` in place of ``out``, which may exist (it is replaced) or not.

    A folder cannot be renamed onto a non-empty one, so the old one is moved aside first: ``out``
    is at every instant absent, the old folder or the new one. ``umask_modes`` gives every entry
    the modes the user's umask gives new files (``mkdtemp`` makes folders private; shared data
    such as the zoo should not be).
    """
    if umask_modes:
        umask = _umask()
        for path in [new, *new.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building_dir(out: Path, *, prefix: str | None = None, umask_modes: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` to build in; it replaces ``out`` when the block ends cleanly.

    If the block raises, the temporary folder is removed and ``out`` is left as it was.
    ``prefix`` names the temporary folder (default ``.<out>.``), e.g. to let a later run recognise
    an orphan of a killed build.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out, umask_modes=umask_modes)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
