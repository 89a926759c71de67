"""One atomic writer for every file mmdiag writes.

A reader never sees a half-written report, checkpoint or table: the content goes to a temporary
file in the destination's folder, which then replaces the destination in one rename. If writing
fails or is interrupted, the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["staged_folder", "write_atomic", "write_atomic_with"]


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically; text is written in text mode, bytes as they are.

    The parent folders are created when missing. Returns the destination as a ``Path``.
    """
    mode = "wb" if isinstance(data, bytes) else "w"

    def write(tmp: Path) -> None:
        with open(tmp, mode) as fh:
            fh.write(data)

    return write_atomic_with(path, write)


def write_atomic_with(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Atomically produce ``path`` with a writer that needs a file path of its own.

    ``write(tmp)`` must write the whole content to ``tmp`` (for example
    ``lambda tmp: torch.save(state, tmp)`` or safetensors' ``save_file``); ``tmp`` then replaces
    ``path``. The parent folders are created when missing. Returns the destination as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a run's outputs into a staging folder beside ``out``, then move them into ``out``.

    The slow part (rendering plots and HTML) writes into the staging folder: a run interrupted
    there leaves ``out`` as it was. On success every staged entry replaces its namesake in ``out``
    (other files already in ``out`` are kept); Ctrl-C is held back during those renames, so an
    interrupted run leaves either none or all of its outputs. On failure the staging folder goes.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".staging"))
    try:
        yield stage
        with _sigint_deferred():
            out.mkdir(parents=True, exist_ok=True)
            for entry in sorted(stage.iterdir()):
                target = out / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt
