import io as _io
import os

import numpy as np
import pytest
from PIL import Image

from cam2seg import io


def _png(arr, mode=None):
    buf = _io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr):
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_list_images_recursive_sorted_filtered(tmp_path):
    for rel in ["b.jpg", "a/z.PNG", "a/y.jpeg", "c/d/e.jpg", "notes.txt", "a/.hidden.jpg", ".cache/x.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    expected = ["a/y.jpeg", "a/z.PNG", "b.jpg", "c/d/e.jpg"]
    assert io.list_images(str(tmp_path)) == expected
    assert io.list_images(f"file://{tmp_path}") == expected
    assert io.list_images(str(tmp_path) + "/", extensions=[".png"]) == ["a/z.PNG"]


def test_list_images_missing_prefix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        io.list_images(str(tmp_path / "nope"))
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        io.list_images(str(tmp_path / "f.jpg"))


@pytest.mark.parametrize("key", ["../x.jpg", "/etc/passwd", "a/../../b", "a//b", "a\\b", "s3://x/y", "", "./a"])
def test_check_key_rejects_unsafe(key):
    with pytest.raises(ValueError):
        io.check_key(key)


def test_check_key_accepts_nested():
    assert io.check_key("line-3/2026-11-24/img_001.jpg") == "line-3/2026-11-24/img_001.jpg"
    with pytest.raises(ValueError):
        io.join("s3://b/root", "../other")


def test_decode_gray_rgb_palette():
    gray = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
    assert (io.decode_image(_png(gray)) == gray).all()
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    assert (io.decode_image(_png(rgb)) == rgb).all()
    jpg = io.decode_image(_jpeg(gray))
    assert jpg.shape == (6, 8) and jpg.dtype == np.uint8
    pal = Image.fromarray(rgb).convert("P")
    buf = _io.BytesIO()
    pal.save(buf, format="PNG")
    assert io.decode_image(buf.getvalue()).shape == (6, 8, 3)


def test_opaque_rgba_converted_transparent_rejected():
    rgba = np.full((4, 5, 4), 200, np.uint8)
    rgba[..., 3] = 255
    out = io.decode_image(_png(rgba))
    assert out.shape == (4, 5, 3) and (out == 200).all()
    rgba[0, 0, 3] = 10
    with pytest.raises(io.ImageDecodeError, match="transparent"):
        io.decode_image(_png(rgba))


def test_16bit_rejected_with_reason():
    arr = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    with pytest.raises(io.ImageDecodeError, match="16"):
        io.decode_image(_png(arr))


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"hello, not an image", "not a recognised"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not a recognised|corrupt")],
)
def test_bad_bytes_rejected(data, reason):
    with pytest.raises(io.ImageDecodeError, match=reason):
        io.decode_image(data)


def test_truncated_jpeg_rejected():
    data = _jpeg(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(io.ImageDecodeError, match="truncated|corrupt"):
        io.decode_image(data[: len(data) // 2])


def test_image_size_from_header():
    assert io.image_size(_png(np.zeros((7, 9), np.uint8))) == (7, 9)


def test_write_bytes_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "dir" / "f.bin"
    io.write_bytes(str(target), b"one")
    io.write_bytes(f"file://{target}", b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["f.bin"]
    assert io.read_bytes(str(target)) == b"two"
    assert io.exists(str(target)) and not io.exists(str(tmp_path / "nope"))


def test_to_rgb():
    g = np.zeros((2, 3), np.uint8)
    assert io.to_rgb(g).shape == (2, 3, 3)
    with pytest.raises(ValueError):
        io.to_rgb(np.zeros((2, 3, 4), np.uint8))
