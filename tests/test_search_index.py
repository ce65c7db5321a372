"""Building, updating and searching an index with a tiny model on generated images."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcraft import encoding
from clipcraft.errors import ClipcraftError
from clipcraft.search.ann import IndexConfig, exact_search
from clipcraft.search.index import CaptionResult, Index, SearchResult, build_index


def make_image(seed: int) -> Image.Image:
    """A coloured picture with a few blocks: different seeds give visibly different images."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((48, 48, 3), dtype=np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, 36, 2)
        arr[y : y + 12, x : x + 12] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(arr)


def write_images(folder: Path, names: list[str], seed0: int = 0) -> None:
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(seed0 + i).save(path)


def write_corrupt(folder: Path) -> None:
    buf = io.BytesIO()
    make_image(99).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.png").write_text("this is text, not a PNG")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from clipcraft import create_model

    torch.manual_seed(0)
    return create_model("tiny").save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    write_images(images, [f"img{i:02d}.png" for i in range(6)] + [f"sub/deeper/s{i}.jpg" for i in range(4)])
    write_corrupt(images)
    return images


REAL_ENCODE_PIXELS = encoding.encode_pixels


class SimulatedCrash(Exception):
    pass


class CountingEmbed:
    """Wraps ``encode_pixels`` (the model step of every encoding loop) to count embedded images, and optionally
    crash after ``crash_after`` batches."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.images = 0
        self.batches = 0
        self.crash_after = crash_after

    def __call__(self, model, pixels, **kwargs):
        if self.crash_after is not None and self.batches >= self.crash_after:
            raise SimulatedCrash(f"crash after {self.batches} batches")
        self.batches += 1
        self.images += pixels.shape[0]
        return REAL_ENCODE_PIXELS(model, pixels, **kwargs)


def build(model_dir, folder, out, **kwargs):
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("batch_size", 4)
    return build_index(model_dir, folder, out, **kwargs)


def test_build_skips_and_counts_unreadable_files(model_dir, folder, tmp_path):
    report = build(model_dir, folder, tmp_path / "idx", workers=2)
    assert report.total == 10 and report.embedded == 10
    assert report.skipped_count == 2
    assert sorted(p for p, _ in report.skipped) == ["notes.png", "truncated.jpg"]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["build"]["skipped_count"] == 2
    files = json.loads((tmp_path / "idx" / "files.json").read_text())
    assert [f["path"] for f in files][:2] == ["img00.png", "img01.png"]
    assert all(f["size"] > 0 and f["mtime_ns"] > 0 for f in files)
    assert np.load(tmp_path / "idx" / "embeddings.npy").shape == (10, 16)


def test_search_returns_ranked_path_score_pairs(model_dir, folder, tmp_path):
    build(model_dir, folder, tmp_path / "idx")
    index = Index.load(tmp_path / "idx")
    hits = index.search_image(folder / "img03.png", k=3)
    assert all(isinstance(h, SearchResult) for h in hits)
    assert hits[0].path == str(folder.resolve() / "img03.png")
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    path, score = index.search_text("a red square", k=4)[0]
    assert Path(path).is_file() and -1.0 <= score <= 1.0
    assert len(index.search_text("anything", k=100)) == 10  # k larger than the index: all images
    with pytest.raises(ClipcraftError, match="empty"):
        index.search_text("   ")


def test_image_embeddings_match_the_model_encode_path(model_dir, folder, tmp_path):
    from clipcraft import load

    build(model_dir, folder, tmp_path / "idx", workers=2)
    index = Index.load(tmp_path / "idx")
    reference = load(model_dir).encode_images(index.paths, normalize=True)
    np.testing.assert_allclose(index.embeddings, reference, atol=1e-5)


def test_index_search_is_exact_numpy_search(model_dir, folder, tmp_path):
    build(model_dir, folder, tmp_path / "idx")
    index = Index.load(tmp_path / "idx")
    queries = index.model.encode_texts(["a dog", "blue", "a red car on a road"], normalize=True)
    scores, ids = index.search_vectors(queries, k=5)
    ref_scores, ref_ids = exact_search(index.embeddings, queries, 5)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (ids == ref_ids).all()


def test_approximate_kind_above_the_threshold(model_dir, folder, tmp_path):
    report = build(model_dir, folder, tmp_path / "idx", config=IndexConfig(exact_threshold=5))
    assert report.index["kind"] == "ivf"
    index = Index.load(tmp_path / "idx")
    assert index.manifest["index"]["nprobe"] >= 1
    assert len(index.search_image(folder / "img00.png", k=3)) == 3


def test_captions_for_image_to_text(model_dir, folder, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text('image,caption\na.jpg,"a dog, on grass"\nb.jpg,a cat\nc.jpg,a red car\n')
    report = build(model_dir, folder, tmp_path / "idx", captions=captions)
    assert report.captions == 3
    index = Index.load(tmp_path / "idx")
    hits = index.search_captions(folder / "img01.png", k=2)
    assert len(hits) == 2 and all(isinstance(h, CaptionResult) for h in hits)
    assert {h.caption for h in hits} <= {"a dog, on grass", "a cat", "a red car"}
    # the captions survive an incremental rebuild without --captions
    assert build(model_dir, folder, tmp_path / "idx").captions == 3


def test_incremental_build_embeds_only_changes(model_dir, folder, tmp_path, monkeypatch):
    build(model_dir, folder, tmp_path / "idx")
    write_images(folder, ["new1.png", "sub/new2.png"], seed0=50)  # added
    modified = folder / "img02.png"
    make_image(77).save(modified)  # changed content, later mtime
    st = modified.stat()
    os.utime(modified, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (folder / "img05.png").unlink()  # deleted
    counter = CountingEmbed()
    monkeypatch.setattr(encoding, "encode_pixels", counter)
    report = build(model_dir, folder, tmp_path / "idx")
    assert counter.images == 3  # two new + one modified; the corrupt files fail in the loader
    # removed: gone from disk; changed: still there with another size or mtime (re-embedded)
    assert (report.embedded, report.removed, report.changed, report.total) == (3, 1, 1, 11)
    assert "1 removed, 1 changed" in report.summary()
    index = Index.load(tmp_path / "idx")
    names = [f.path for f in index.files]
    assert "img05.png" not in names and "new1.png" in names and "sub/new2.png" in names
    row = names.index("img02.png")
    assert index.search_image(modified, k=1)[0].path == index.paths[row]
    counter.images = 0
    assert build(model_dir, folder, tmp_path / "idx").embedded == 0
    assert counter.images == 0


def test_interrupted_build_continues_and_never_leaves_a_half_written_index(
    model_dir, folder, tmp_path, monkeypatch
):
    out = tmp_path / "idx"
    monkeypatch.setattr(encoding, "encode_pixels", CountingEmbed(crash_after=2))
    with pytest.raises(SimulatedCrash):
        build(model_dir, folder, out)
    assert not out.exists()  # nothing at the target until the whole index is written
    assert not list(tmp_path.glob(".idx.tmp-*"))
    counter = CountingEmbed()
    monkeypatch.setattr(encoding, "encode_pixels", counter)
    report = build(model_dir, folder, out)
    # two batches were saved before the crash: 4 images, then 3 (the fourth file there is notes.png)
    assert counter.images == 10 - 7
    assert (report.embedded, report.reused, report.total) == (3, 7, 10)
    assert not (tmp_path / ".idx.partial").exists()

    # an interrupted update leaves the previous index readable and complete
    write_images(folder, [f"more{i}.png" for i in range(6)], seed0=200)
    monkeypatch.setattr(encoding, "encode_pixels", CountingEmbed(crash_after=1))
    with pytest.raises(SimulatedCrash):
        build(model_dir, folder, out)
    assert len(Index.load(out)) == 10
    monkeypatch.setattr(encoding, "encode_pixels", counter := CountingEmbed())
    assert build(model_dir, folder, out).total == 16
    assert counter.images == 2


def test_another_model_is_a_clear_error(model_dir, folder, tmp_path):
    import torch

    from clipcraft import create_model

    build(model_dir, folder, tmp_path / "idx")
    torch.manual_seed(1)
    other = create_model("tiny").save(tmp_path / "other")
    with pytest.raises(ClipcraftError, match="not the model that built the index"):
        Index.load(tmp_path / "idx", model=other)
    with pytest.raises(ClipcraftError, match="not the model that built the index"):
        build(other, folder, tmp_path / "idx")
    assert len(Index.load(tmp_path / "idx", model=model_dir)) == 10


def test_loading_something_that_is_not_an_index(tmp_path):
    with pytest.raises(ClipcraftError, match="not a clipcraft index"):
        Index.load(tmp_path)


def test_lazy_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, clipcraft.search, clipcraft.search.commands; print(sorted(m for m in ('torch', 'faiss', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hidden_files_are_listed_and_an_empty_folder_is_an_error(model_dir, folder, tmp_path):
    (folder / ".secret.png").write_bytes((folder / "img01.png").read_bytes())
    (folder / ".cache").mkdir()
    (folder / ".cache" / "thumb.png").write_bytes((folder / "img01.png").read_bytes())
    report = build(model_dir, folder, tmp_path / "idx")
    assert report.hidden == [".cache", ".secret.png"] and report.hidden_count == 2
    assert "2 hidden file(s) or folder(s) skipped" in report.summary()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no pictures here")
    with pytest.raises(ClipcraftError, match=r"No image files under .*empty"):
        build(model_dir, empty, tmp_path / "idx2")
    assert not (tmp_path / "idx2").exists()
