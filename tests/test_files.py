"""Atomic directory and file writes: an interrupted write leaves the previous version whole."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clipcraft.files import atomic_dir, atomic_file


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_directory_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "deep" / "model"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "a.txt").write_text("one")
    assert _tree(target) == {"a.txt": "one"}
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
        assert _tree(target) == {"a.txt": "one"}  # readers still see the old version
    assert _tree(target) == {"b.txt": "two"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # nothing left beside it


def test_an_error_while_writing_leaves_the_old_directory_intact(tmp_path):
    target = tmp_path / "index"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    assert _tree(target) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new") as tmp:
        raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_a_killed_writer_leaves_the_old_directory_and_file_intact(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("old")
    (tmp_path / "f.bin").write_bytes(b"old")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from clipcraft.files import atomic_dir, atomic_file\n"
        "root = Path(sys.argv[1])\n"
        "with atomic_file(root / 'f.bin') as fh:\n"
        "    fh.write(b'new, but not all of it')\n"
        "    with atomic_dir(root / 'out') as tmp:\n"
        "        (tmp / 'a.txt').write_text('half')\n"
        "        os._exit(3)  # no cleanup, no finally: as if killed\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 3
    assert _tree(tmp_path / "out") == {"a.txt": "old"}
    assert (tmp_path / "f.bin").read_bytes() == b"old"


def test_atomic_file_replaces_only_after_success(tmp_path):
    target = tmp_path / "batch.npz"
    with atomic_file(target) as fh:
        fh.write(b"first")
    with pytest.raises(ValueError), atomic_file(target) as fh:
        fh.write(b"sec")
        raise ValueError
    assert target.read_bytes() == b"first"
    with atomic_file(target) as fh:
        fh.write(b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.npz"]
