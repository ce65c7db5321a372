"""The shared image-encoding loop: loading and skipping files, the class-token shortcut against the full
forward, and the digests that key the caches."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcraft import encoding
from clipcraft.digests import files_digest, model_identity, weights_digest
from clipcraft.encoding import (
    MIN_IMAGES_FOR_WORKERS,
    EncodeSettings,
    default_workers,
    encode_files,
    encode_pixels,
    iter_encoded,
    shortcut_unavailable,
)


@pytest.fixture(scope="module")
def token_model():
    """The tiny preset with class-token pooling (the tiny preset itself averages tokens) and 3 blocks."""
    from clipcraft import create_model

    torch.manual_seed(0)
    overrides = {"image.model_kwargs.global_pool": "token", "image.model_kwargs.depth": 3}
    model = create_model("tiny", overrides=overrides).eval()
    with torch.no_grad():  # a random class token barely depends on the image; make the test sensitive
        for block in model.image_tower.trunk.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model


def write_files(folder: Path, n: int) -> list[str]:
    """``n`` coloured pictures of different sizes, with a truncated JPEG and a text file at positions 1 and 4."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        size = (40 + 7 * i, 48 + 3 * i, 3)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)
        paths.append(str(path))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.png").write_text("not a picture")
    paths.insert(1, str(folder / "truncated.jpg"))
    paths.insert(4, str(folder / "notes.png"))
    return paths


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- the class-token shortcut ---------------------------------------------------------------------------------


@pytest.mark.parametrize("project", [True, False])
def test_shortcut_matches_the_full_tower_on_random_pixels(token_model, project: bool) -> None:
    assert shortcut_unavailable(token_model) is None
    pixels = torch.randn(5, 3, 32, 32)
    full = encode_pixels(token_model, pixels, project=project, shortcut=False)
    fast = encode_pixels(token_model, pixels, project=project, shortcut=True)
    assert fast.shape == full.shape == ((5, 16) if project else (5, 32))
    assert cosines(fast, full).min() >= 0.9999
    np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-5)
    # and the rows differ between images, so the comparison is not vacuous
    assert cosines(full[:1].repeat(4, 0), full[1:]).max() < 0.999


def test_shortcut_matches_the_full_tower_on_real_images(token_model, shared_data: Path) -> None:
    folder = shared_data / "flickr8k" / "images"
    paths = sorted(str(p) for p in folder.glob("*.jpg"))[:6]
    if len(paths) < 6:
        pytest.skip(f"no Flickr8k images in {folder}")
    full = encode_files(token_model, paths, EncodeSettings(batch_size=4, workers=0, shortcut=False))
    fast = encode_files(token_model, paths, EncodeSettings(batch_size=4, workers=0, shortcut=True))
    assert full.ok.all() and fast.ok.all()
    assert cosines(fast.vectors, full.vectors).min() >= 0.9999


def test_shortcut_leaves_the_model_as_it_was(token_model) -> None:
    trunk = token_model.image_tower.trunk
    blocks = list(trunk.blocks)
    token_model.train()
    try:
        encode_pixels(token_model, torch.randn(2, 3, 32, 32), shortcut=True)
        assert token_model.training  # inference mode came and went
        assert list(trunk.blocks) == blocks and type(trunk.blocks[-1]).__name__ == "Block"
    finally:
        token_model.eval()


def test_unsupported_towers_fall_back_with_a_reason(tiny_model, token_model, tmp_path: Path) -> None:
    # the tiny preset averages its tokens: every token matters, so there is no shortcut to take
    assert "pools with 'avg'" in shortcut_unavailable(tiny_model)
    assert encoding.resolve_shortcut(tiny_model, None) is False
    assert encoding.resolve_shortcut(tiny_model, False) is False
    assert encoding.resolve_shortcut(token_model, None) is True
    assert encoding.resolve_shortcut(token_model, False) is False
    paths = write_files(tmp_path, 3)
    with pytest.warns(UserWarning, match="class-token shortcut is not available: the image tower pools"):
        asked = encode_files(tiny_model, paths, EncodeSettings(batch_size=2, workers=0, shortcut=True))
    plain = encode_files(tiny_model, paths, EncodeSettings(batch_size=2, workers=0, shortcut=False))
    np.testing.assert_array_equal(asked.vectors, plain.vectors)


# -- the loop -------------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_reported_in_input_order(token_model, tmp_path: Path) -> None:
    paths = write_files(tmp_path, 6)
    batches = list(iter_encoded(token_model, paths, EncodeSettings(batch_size=3, workers=0)))
    assert [b.positions for b in batches] == [[0, 2], [3, 5], [6, 7]]
    failed = [bad for b in batches for bad in b.failed]
    assert [(bad.index, bad.kind) for bad in failed] == [(1, "unreadable_image"), (4, "unreadable_image")]
    assert failed[0].where == paths[1] and failed[1].where == paths[4]
    result = encode_files(token_model, paths, EncodeSettings(batch_size=3, workers=0))
    assert result.ok.tolist() == [True, False, True, True, False, True, True, True]
    assert not result.vectors[~result.ok].any()
    # each good row is that file's own embedding, whatever batch it came in
    alone = [
        encode_files(token_model, [p], EncodeSettings(workers=0)).vectors[0]
        for p in np.asarray(paths)[result.ok]
    ]
    np.testing.assert_allclose(result.vectors[result.ok], np.stack(alone), rtol=1e-4, atol=1e-6)


def test_a_transform_failure_is_a_skip_not_a_crash(token_model, tmp_path: Path, monkeypatch) -> None:
    paths = write_files(tmp_path, 2)[:1] + [str(tmp_path / "01.png")]
    real = token_model.image_transform

    def picky(train: bool = False):
        transform = real(train)

        def apply(image):
            if image.size[0] > 50:  # 00.png is 48 pixels wide, 01.png 51
                raise ValueError("too wide for this test")
            return transform(image)

        return apply

    monkeypatch.setattr(token_model, "image_transform", picky)
    result = encode_files(token_model, paths, EncodeSettings(workers=0))
    assert result.ok.tolist() == [True, False]
    assert "could not preprocess: ValueError: too wide" in result.failed[0].reason


def test_encoding_leaves_the_global_rng_alone(token_model, tmp_path: Path) -> None:
    paths = write_files(tmp_path, 3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    encode_files(token_model, paths, EncodeSettings(batch_size=2, workers=0, project=False))
    assert torch.equal(torch.get_rng_state(), before)


def test_empty_input_and_bad_batch_size(token_model) -> None:
    empty = encode_files(token_model, [], EncodeSettings(workers=0))
    assert empty.vectors.shape == (0, 16) and empty.ok.shape == (0,) and empty.failed == []
    with pytest.raises(Exception, match="batch_size"):
        list(iter_encoded(token_model, ["x.png"], EncodeSettings(batch_size=0)))


def test_worker_rule() -> None:
    assert default_workers(MIN_IMAGES_FOR_WORKERS - 1) == 0
    many = default_workers(MIN_IMAGES_FOR_WORKERS)
    assert many == default_workers() == max(1, min(8, (os.cpu_count() or 2) // 2))


# -- digests --------------------------------------------------------------------------------------------------


def test_identity_follows_weights_and_config(token_model, tiny_model) -> None:
    import copy

    same = copy.deepcopy(token_model)
    assert model_identity(same) == model_identity(token_model)
    assert weights_digest(same.image_tower) == weights_digest(token_model.image_tower)
    with torch.no_grad():
        next(same.image_tower.parameters()).view(-1)[0] += 1e-3
    assert model_identity(same) != model_identity(token_model)
    assert weights_digest(same.image_tower) != weights_digest(token_model.image_tower)
    assert weights_digest(same.text_tower) == weights_digest(token_model.text_tower)
    assert model_identity(tiny_model) != model_identity(token_model)  # other config


def test_files_digest_follows_paths_sizes_and_times(tmp_path: Path) -> None:
    paths = write_files(tmp_path, 2)
    first = files_digest(paths)
    assert files_digest(paths) == first
    assert files_digest(list(reversed(paths))) != first
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert files_digest(paths) != first
    assert files_digest([str(tmp_path / "gone.png")]) != files_digest([str(tmp_path / "other.png")])
