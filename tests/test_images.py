from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipcraft import images
from clipcraft.errors import ImageLoadError
from clipcraft.images import load_image, to_rgb


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    got = np.asarray(out)[..., 0]
    assert got.tolist() == [[0, 255], [128, 4]]


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = np.asarray(to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (4, 3))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (4, 3)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="not found: .*nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a jpeg")
    with pytest.raises(ImageLoadError, match="Not an image"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (2, 4)


def test_wrong_type():
    with pytest.raises(ImageLoadError, match="Expected a file path"):
        load_image(123)  # type: ignore[arg-type]


def test_paths_and_bytes_go_through_the_same_checks(tmp_path, monkeypatch):
    from clipcraft.images import MISSING_FILE, TOO_LARGE, UNREADABLE_IMAGE, BadImageError, decode_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (6, 3), (10, 200, 30)).save(tmp_path / "good.jpg", exif=exif)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    good = tmp_path / "good.jpg"
    assert np.array_equal(np.asarray(decode_image(good)), np.asarray(decode_image(good.read_bytes())))
    assert decode_image(good.read_bytes()).size == (3, 6)  # EXIF applied to bytes too
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 5000)
    for name, kind in (("junk.png", UNREADABLE_IMAGE), ("big.png", TOO_LARGE)):
        for source in (tmp_path / name, (tmp_path / name).read_bytes()):
            with pytest.raises(BadImageError) as info:
                decode_image(source, where=name)
            assert (info.value.kind, info.value.where) == (kind, name)
        with pytest.raises(ImageLoadError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(BadImageError) as info:
        decode_image(tmp_path / "gone.png")
    assert info.value.kind == MISSING_FILE
    assert decode_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)  # a caller's own limit


def test_draft_decoding_is_a_faster_path_to_the_same_thumbnail(tmp_path):
    """decode_image(draft=N) decodes a JPEG at a reduced scale, never below N; its thumbnail matches the
    thumbnail of the full decode (parity of the fast path)."""
    from clipcraft.images import decode_image

    y, x = np.mgrid[0:1200, 0:1600]
    arr = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=90)
    full = decode_image(tmp_path / "big.jpg")
    fast = decode_image(tmp_path / "big.jpg", draft=256)
    assert full.size == (1600, 1200) and fast.size[0] < 1600 and min(fast.size) >= 256
    full.thumbnail((256, 256), resample=3)
    fast.thumbnail((256, 256), resample=3)
    assert full.size == fast.size
    diff = np.abs(np.asarray(full, np.float32) - np.asarray(fast, np.float32)).mean()
    assert diff < 12.0
    png = tmp_path / "big.png"
    Image.fromarray(arr).save(png)
    assert decode_image(png, draft=256).size == (1600, 1200)  # formats without draft decode in full
