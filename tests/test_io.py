"""mmdiag.io: the one atomic writer (text, bytes, and writers that need a path of their own)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from mmdiag.io import write_atomic, write_atomic_with


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_text_and_bytes_land_whole_in_new_folders(tmp_path: Path) -> None:
    text = tmp_path / "a" / "b" / "report.json"
    assert write_atomic(text, "{}\n") == text and text.read_text() == "{}\n"
    blob = tmp_path / "c" / "plot.png"
    write_atomic(blob, b"\x89PNG\x00")
    assert blob.read_bytes() == b"\x89PNG\x00"
    write_atomic(text, "replaced")
    assert text.read_text() == "replaced"
    assert not _leftovers(text.parent) and not _leftovers(blob.parent)


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    path = write_atomic(tmp_path / "x.csv", "a,b\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_writer_that_needs_a_path(tmp_path: Path) -> None:
    state = {"w": torch.arange(3.0)}
    path = write_atomic_with(str(tmp_path / "m.pt"), lambda tmp: torch.save(state, tmp))
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    assert not _leftovers(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = write_atomic(tmp_path / "report.json", "old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic_with(path, boom)
    assert path.read_text() == "old" and not _leftovers(tmp_path)
