"""The one encoder: image inputs of every kind, skipping bad files, the class-token shortcut against the full
forward, the settings that key the cache, and the digests."""

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
    EncodingCache,
    default_workers,
    encode_images,
    encode_pixels,
    encode_texts,
    iter_images,
    shortcut_unavailable,
)
from clipcraft.precision import Precision


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


@pytest.mark.parametrize("output", ["embeddings", "features"])
def test_shortcut_matches_the_full_tower_on_random_pixels(token_model, output: str) -> None:
    assert shortcut_unavailable(token_model) is None
    pixels = torch.randn(5, 3, 32, 32)
    full = encode_pixels(token_model, pixels, output=output, shortcut=False)
    fast = encode_pixels(token_model, pixels, output=output, shortcut=True)
    assert fast.shape == full.shape == ((5, 16) if output == "embeddings" else (5, 32))
    assert cosines(fast, full).min() >= 0.9999
    np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-5)
    # and the rows differ between images, so the comparison is not vacuous
    assert cosines(full[:1].repeat(4, 0), full[1:]).max() < 0.999


def test_shortcut_matches_the_full_tower_on_real_images(token_model, shared_data: Path) -> None:
    folder = shared_data / "flickr8k" / "images"
    paths = sorted(str(p) for p in folder.glob("*.jpg"))[:6]
    if len(paths) < 6:
        pytest.skip(f"no Flickr8k images in {folder}")
    full = encode_images(token_model, paths, EncodeSettings(batch_size=4, workers=0, shortcut=False))
    fast = encode_images(token_model, paths, EncodeSettings(batch_size=4, workers=0, shortcut=True))
    assert full.ok.all() and fast.ok.all() and not full.failed
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
        asked = encode_images(tiny_model, paths, EncodeSettings(batch_size=2, workers=0, shortcut=True))
    plain = encode_images(tiny_model, paths, EncodeSettings(batch_size=2, workers=0, shortcut=False))
    np.testing.assert_array_equal(asked.vectors, plain.vectors)


# -- the loop -------------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_reported_in_input_order(token_model, tmp_path: Path) -> None:
    paths = write_files(tmp_path, 6)
    batches = list(iter_images(token_model, paths, EncodeSettings(batch_size=3, workers=0)))
    assert [b.positions for b in batches] == [[0, 2], [3, 5], [6, 7]]
    failed = [bad for b in batches for bad in b.failed]
    assert [(bad.index, bad.kind) for bad in failed] == [(1, "unreadable_image"), (4, "unreadable_image")]
    assert failed[0].where == paths[1] and failed[1].where == paths[4]
    result = encode_images(token_model, paths, EncodeSettings(batch_size=3, workers=0))
    assert result.ok.tolist() == [True, False, True, True, False, True, True, True]
    assert result.kept.tolist() == [0, 2, 3, 5, 6, 7] and result.vectors.shape == (6, 16)
    assert result.inputs == paths and result.precision is Precision.FP32 and result.output == "embeddings"
    dense = result.dense()
    assert not dense[~result.ok].any() and np.array_equal(dense[result.ok], result.vectors)
    # each good row is that file's own embedding, whatever batch it came in
    alone = [
        encode_images(token_model, [p], EncodeSettings(workers=0)).vectors[0]
        for p in np.asarray(paths)[result.ok]
    ]
    np.testing.assert_allclose(result.vectors, np.stack(alone), rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match=r"Could not load image .*truncated.jpg.* \(and 1 more\)"):
        result.check_all()


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
    result = encode_images(token_model, paths, EncodeSettings(workers=0))
    assert result.ok.tolist() == [True, False] and result.failed[0].index == 1
    assert "could not preprocess: ValueError: too wide" in result.failed[0].reason


def test_encoding_leaves_the_global_rng_alone(token_model, tmp_path: Path) -> None:
    paths = write_files(tmp_path, 3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    encode_images(token_model, paths, EncodeSettings(batch_size=2, workers=0, output="features"))
    assert torch.equal(torch.get_rng_state(), before)


def test_empty_input_and_bad_batch_size(token_model) -> None:
    empty = encode_images(token_model, [], EncodeSettings(workers=0))
    assert empty.vectors.shape == (0, 16) and empty.ok.shape == (0,) and empty.failed == []
    assert encode_texts(token_model, [], EncodeSettings()).vectors.shape == (0, 16)
    with pytest.raises(Exception, match="batch_size"):
        EncodeSettings(batch_size=0)
    with pytest.raises(Exception, match="output"):
        EncodeSettings(output="logits")


def test_settings_take_a_concrete_precision_never_auto() -> None:
    assert EncodeSettings(precision="bf16").precision is Precision.BF16
    with pytest.raises(Exception, match="resolve it first"):
        EncodeSettings(precision="auto")


# -- every kind of image input, one result --------------------------------------------------------------------


def test_paths_pil_images_tensors_and_a_folder_give_the_same_vectors(token_model, tmp_path: Path) -> None:
    from clipcraft.images import load_image

    paths = [p for p in write_files(tmp_path / "pics", 3) if p.endswith("png") and "notes" not in p]
    settings = EncodeSettings(batch_size=2, workers=0)
    by_path = encode_images(token_model, paths, settings)
    pil = [load_image(p) for p in paths]
    by_pil = encode_images(token_model, pil, settings)
    transform = token_model.image_transform(train=False)
    pixels = torch.stack([transform(im) for im in pil])  # (3, 3, H, W)
    by_tensor = encode_images(token_model, pixels, settings)
    folder = encode_images(token_model, tmp_path / "pics", settings)  # its image files, sorted
    assert by_path.vectors.shape == (3, 16)
    for other in (by_pil, by_tensor):
        np.testing.assert_allclose(other.vectors, by_path.vectors, rtol=1e-5, atol=1e-6)
    assert by_pil.inputs == ["<image 0>", "<image 1>", "<image 2>"]
    # the folder holds the two bad files too: they are reported, the good rows are the same vectors
    assert sorted(Path(b.where).name for b in folder.failed) == ["notes.png", "truncated.jpg"]
    np.testing.assert_allclose(folder.vectors, by_path.vectors, rtol=1e-5, atol=1e-6)


def test_bf16_is_close_to_fp32_and_recorded(token_model, tmp_path: Path) -> None:
    paths = [p for p in write_files(tmp_path, 4) if "notes" not in p and "truncated" not in p]
    fp32 = encode_images(token_model, paths, EncodeSettings(workers=0))
    bf16 = encode_images(token_model, paths, EncodeSettings(workers=0, precision=Precision.BF16))
    texts = ["a red square", "two dogs on the grass", "x"]
    t32 = encode_texts(token_model, texts, EncodeSettings())
    t16 = encode_texts(token_model, texts, EncodeSettings(precision=Precision.BF16))
    assert bf16.precision is Precision.BF16 and bf16.vectors.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: close to fp32 (cosine >= 0.99), but not the same numbers
    assert cosines(bf16.vectors, fp32.vectors).min() >= 0.99
    assert cosines(t16.vectors, t32.vectors).min() >= 0.99
    assert not np.array_equal(bf16.vectors, fp32.vectors)


# -- the cache ------------------------------------------------------------------------------------------------


def test_the_cache_keys_on_model_inputs_and_settings(token_model, tmp_path: Path, monkeypatch) -> None:
    paths = [p for p in write_files(tmp_path / "pics", 3) if "notes" not in p]
    cache = EncodingCache(tmp_path / "cache")
    calls = []
    real = encoding.encode_pixels
    monkeypatch.setattr(encoding, "encode_pixels", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = EncodeSettings(batch_size=8, workers=0)
    first = encode_images(token_model, paths, settings, cache=cache)
    assert (cache.hits, cache.misses, len(calls)) == (0, 1, 1)
    again = encode_images(token_model, paths, EncodeSettings(batch_size=2, workers=0), cache=cache)
    assert (cache.hits, len(calls)) == (1, 1)  # batch size is speed, not part of the key
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert again.kept.tolist() == first.kept.tolist()
    assert [(b.index, b.kind, b.where) for b in again.failed] == [
        (b.index, b.kind, b.where) for b in first.failed
    ]
    encode_images(token_model, paths, EncodeSettings(workers=0, precision=Precision.BF16), cache=cache)
    encode_images(token_model, paths, EncodeSettings(workers=0, output="features"), cache=cache)
    assert cache.misses == 3 and len(calls) == 3  # precision and output are part of the key
    texts = ["one caption", "another"]
    t1 = encode_texts(token_model, texts, settings, cache=cache)
    t2 = encode_texts(token_model, texts, settings, cache=cache)
    t3 = encode_texts(token_model, texts, EncodeSettings(precision=Precision.BF16), cache=cache)
    np.testing.assert_array_equal(t1.vectors, t2.vectors)
    assert not np.array_equal(t1.vectors, t3.vectors)


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
