"""Walking an image folder and reading caption files."""

from __future__ import annotations

import pytest

from clipcraft.data.folder import scan_images
from clipcraft.errors import ClipcraftError
from clipcraft.search.collection import read_captions


def test_scan_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ["z.JPG", "a.png", "b/c/d.webp", "b/x.txt", ".hidden/h.png", "b/.dot.png"]:
        (tmp_path / name).write_bytes(b"12345")
    entries = scan_images(tmp_path)
    assert [e.path for e in entries] == ["a.png", "b/c/d.webp", "z.JPG"]
    assert all(e.size == 5 and e.mtime_ns > 0 for e in entries)


def test_scan_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(ClipcraftError, match="not found"):
        scan_images(tmp_path / "nope")


def test_captions_from_text_and_csv(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("a dog\n\n  a cat  \na dog\n")
    assert read_captions(txt) == ["a dog", "a cat"]
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text('image,caption\n1.jpg,"a dog, running"\n2.jpg,a cat\n')
    assert read_captions(csv_file) == ["a dog, running", "a cat"]
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(ClipcraftError, match="no captions"):
        read_captions(empty)
    with pytest.raises(ClipcraftError, match="not found"):
        read_captions(tmp_path / "missing.txt")
