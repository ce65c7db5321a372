"""Labelled image sets: class folders (empty class, non-images, limits, class-name files) and image,label CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcraft.errors import ClipcraftError
from clipcraft.evaluation.labelled import open_labelled, read_class_folder, read_label_csv


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    for name, count in (("sea_lion", 2), ("cat", 3)):
        for i in range(count):
            _png(root / name / f"{i}.png", 10 * i)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_class_folder_sorted_keys_labels_and_readable_names(folder: Path) -> None:
    data = read_class_folder(folder)
    assert data.keys == ["cat", "sea_lion"]
    assert data.classnames == ["cat", "sea lion"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert [Path(p).name for p in data.paths] == ["0.png", "1.png", "2.png", "0.png", "1.png"]
    assert len(data) == 5 and data.num_classes == 2


def test_limit_per_class_keeps_the_first_files(folder: Path) -> None:
    data = read_class_folder(folder, limit_per_class=1)
    assert data.labels.tolist() == [0, 1]
    assert all(Path(p).name == "0.png" for p in data.paths)
    with pytest.raises(ClipcraftError, match="positive"):
        read_class_folder(folder, limit_per_class=0)


def test_class_name_file_maps_folders_to_names(folder: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.tsv"
    names.write_text("sea_lion\tsea lion, the animal\ncat\tdomestic cat\n")
    assert read_class_folder(folder, names).classnames == ["domestic cat", "sea lion, the animal"]
    names.write_text("cat\tdomestic cat\n")
    with pytest.raises(ClipcraftError, match="no name for 1"):
        read_class_folder(folder, names)


def test_empty_class_folder_is_a_clear_error(folder: Path) -> None:
    (folder / "dog").mkdir()
    (folder / "dog" / "readme.md").write_text("images go here")
    with pytest.raises(ClipcraftError, match=r"hold no image files: dog"):
        read_class_folder(folder)


def test_folder_without_class_subfolders_and_missing_folder(tmp_path: Path) -> None:
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(ClipcraftError, match="no class subfolders"):
        read_class_folder(tmp_path / "flat")
    with pytest.raises(ClipcraftError, match="not found"):
        read_class_folder(tmp_path / "nope")


def test_label_csv_relative_paths_and_class_order(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    _png(tmp_path / "img" / "c.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text('Image,Label\nimg/a.png,dog\nimg/b.png,"cat, tabby"\nimg/c.png,dog\n')
    data = read_label_csv(csv_path)
    assert data.keys == ["cat, tabby", "dog"]
    assert data.labels.tolist() == [0, 1, 1]
    assert data.paths == [str(tmp_path / "img" / n) for n in ("b.png", "a.png", "c.png")]


def test_label_csv_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\na.png,a dog\n")
    with pytest.raises(ClipcraftError, match="no label column"):
        read_label_csv(bad)
    bad.write_text("image,label\na.png,dog\nb.png,\n")
    with pytest.raises(ClipcraftError, match=r"bad.csv:3: empty label"):
        read_label_csv(bad)
    bad.write_text("image,label\n")
    with pytest.raises(ClipcraftError, match="no rows"):
        read_label_csv(bad)


def test_open_labelled_picks_the_test_split_of_a_split_root(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(tmp_path / split / cls / f"{split}.png")
    assert all("/test/" in p for p in open_labelled(tmp_path).paths)
    assert all("/train/" in p for p in open_labelled(tmp_path, split="train").paths)
    with pytest.raises(ClipcraftError, match="no 'dev' folder"):
        open_labelled(tmp_path, split="dev")
    assert np.array_equal(open_labelled(tmp_path / "test").labels, [0, 1])
