"""Hostile inputs (issue 16): files that must become error rows or one-line refusals, never
tracebacks, aborted jobs, silent mislabels or files read outside their folder."""

from __future__ import annotations

import csv
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pyarrow as pa
import pytest

from cam2seg import archive, io, rle, store
from cam2seg.cli import main
from cam2seg.pipeline.label import read_batch
from cam2seg.synthetic import synth

SIZE = (16, 32)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A few-hundred-byte PNG whose header declares width x height grey pixels (zeros)."""
    row = b"\0" * (1 + width)  # filter byte + pixels
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(64)) + comp.flush()  # truncated, that's fine
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def good_png(h: int = 20, w: int = 40) -> bytes:
    return io.encode_png((np.arange(h * w) % 251).astype(np.uint8).reshape(h, w))


def _batch(prefix, ids):
    return read_batch({"image_id": np.array(ids, dtype=object)}, str(prefix), SIZE, None, 2)


# --- item 3: decompression bombs and every other decoder failure -----------------------------


def test_bomb_is_an_error_row_and_its_neighbours_are_read(tmp_path):
    (tmp_path / "a.png").write_bytes(good_png())
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    out = _batch(tmp_path, ["a.png", "bomb.png"])
    assert out["error"][0] == "" and out["height"][0] == 20
    assert "pixels" in out["error"][1] and "limit" in out["error"][1]
    # under Pillow's own bomb limit, cam2seg's (label.max_pixels) is checked from the header
    (tmp_path / "big.png").write_bytes(bomb_png(9000, 9000))
    out = read_batch({"image_id": np.array(["big.png", "a.png"], dtype=object)}, str(tmp_path), SIZE, None, 2,
                     max_pixels=64 * 1024 * 1024)
    assert "9000x9000" in out["error"][0] and "over the limit" in out["error"][0] and out["error"][1] == ""
    tracemalloc.start()
    try:
        with pytest.raises(io.ImageDecodeError, match="3000x3000 = 9000000 pixels, over the limit"):
            io.decode_image(bomb_png(3000, 3000), max_pixels=1000 * 1000)
        assert tracemalloc.get_traced_memory()[1] < 2 << 20  # refused before any pixel was decoded
    finally:
        tracemalloc.stop()


def test_any_decoder_exception_is_an_image_decode_error(tmp_path, monkeypatch):
    from PIL import ImageFile

    from cam2seg import preprocess

    (tmp_path / "a.png").write_bytes(good_png())
    (tmp_path / "b.png").write_bytes(good_png())

    def crash(self):
        raise RuntimeError("decoder crashed")

    monkeypatch.setattr(ImageFile.ImageFile, "load", crash)
    with pytest.raises(io.ImageDecodeError, match="decoder crashed"):
        io.decode_image(good_png())
    out = _batch(tmp_path, ["a.png"])
    assert "decoder crashed" in out["error"][0]
    monkeypatch.undo()

    real = preprocess.prepare

    def resize_fails(img, size, channels=1):
        if img.shape[1] == 40 and img[0, 1] == 1:
            raise RuntimeError("cv2.error: resize failed")
        return real(img, size, channels)

    monkeypatch.setattr(preprocess, "prepare", resize_fails)
    (tmp_path / "c.png").write_bytes(io.encode_png(np.full((20, 30), 7, np.uint8)))
    out = _batch(tmp_path, ["b.png", "c.png"])
    assert "resize failed" in out["error"][0] and out["error"][1] == ""


# --- item 8: symlinks that leave the prefix ------------------------------------------------


def test_symlink_outside_the_prefix_is_listed_and_refused(tmp_path):
    prefix, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    prefix.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes(good_png())
    (prefix / "a.png").write_bytes(good_png())
    (prefix / "sub").mkdir()
    os.symlink(elsewhere / "secret.png", prefix / "outside_link.png")
    os.symlink(prefix / "a.png", prefix / "sub" / "inside_link.png")  # stays inside: fine
    keys = io.list_images(str(prefix))
    assert keys == ["a.png", "outside_link.png", "sub/inside_link.png"]
    out = _batch(prefix, keys)
    assert list(out["error"][[0, 2]]) == ["", ""]
    assert "resolves outside the image prefix" in out["error"][1] and out["height"][1] == 0
    assert io.outside_prefix(str(prefix / "outside_link.png"), str(prefix))
    assert not io.outside_prefix("s3://bucket/images/x.png", "s3://bucket/images")


# --- item 5: synth over an existing archive --------------------------------------------------


def test_synth_refuses_a_non_empty_folder_unless_force(tmp_path, capsys):
    out = tmp_path / "s_over"
    args = ["synth", str(out), "--height", "32", "--width", "128", "--seed", "1"]
    assert main(args + ["--images", "12"]) == 0
    before = (out / "train.csv").read_bytes()
    capsys.readouterr()
    assert main(args + ["--images", "4", "--seed", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--force" in err, err
    assert (out / "train.csv").read_bytes() == before and len(os.listdir(out / "train_images")) == 12
    assert main(args + ["--images", "4", "--force"]) == 0
    assert len(os.listdir(out / "train_images")) == 4 and len(archive.Archive.open(str(out))) == 4


# --- item 6: archives that must be refused with the file and line ----------------------------


def _archive(tmp_path, csv_bytes: bytes):
    root = tmp_path / "arch"
    (root / "train_images").mkdir(parents=True)
    (root / "train_images" / "a.png").write_bytes(good_png())
    (root / "train.csv").write_bytes(csv_bytes)
    return root


def test_huge_csv_line_is_refused_streaming(tmp_path, capsys):
    big = 24 << 20  # 24 MB on one line (the limit, archive.MAX_LINE_BYTES, is 8 MB)
    root = _archive(tmp_path, b"ImageId,ClassId,EncodedPixels\na.png,1,\"" + b"1 1 " * (big // 4) + b"\"\n")
    tracemalloc.start()
    try:
        with pytest.raises(archive.ArchiveError, match=r"train\.csv line 2: longer than"):
            archive.Archive.open(str(root))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak  # never the whole 24 MB line
    assert main(["stats", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.csv line 2" in err and "Traceback" not in err


def test_latin1_csv_names_the_file_and_line(tmp_path, capsys):
    root = _archive(tmp_path, b"ImageId,ClassId,EncodedPixels\na.png,1,1 2\ncaf\xe9.png,1,1 2\n")
    assert main(["stats", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{root}/train.csv line 3" in err and "UTF-8" in err, err


def test_csv_field_over_many_short_lines_names_the_line(tmp_path):
    """A quoted field spanning lines, each under the line limit, still cannot grow without bound."""
    part = b"1 1 " * (1 << 20) + b"\n"  # 4 MB lines, a 12 MB field
    root = _archive(tmp_path, b"ImageId,ClassId,EncodedPixels\na.png,1,\"" + part * 3 + b"\"\n")
    with pytest.raises(archive.ArchiveError, match=r"train\.csv line \d+: field larger than field limit"):
        archive.Archive.open(str(root))


def _synth(tmp_path, n=8):
    root = tmp_path / "a"
    synth.write_archive(str(root), images=n, height=32, width=128, seed=3, progress=None)
    return root


def test_zero_byte_image_fails_the_archive_before_training(tmp_path, capsys):
    root = _synth(tmp_path)
    victim = sorted(os.listdir(root / "train_images"))[3]
    (root / "train_images" / victim).write_bytes(b"")
    with pytest.raises(archive.ArchiveError, match=f"{victim} \\(empty file\\)"):
        archive.Archive.open(str(root))
    assert main(["train-classifiers", "--data", str(root), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and victim in err, err
    assert not (tmp_path / "m").exists()


def test_check_images_reads_headers(tmp_path):
    root = _synth(tmp_path)
    names = sorted(os.listdir(root / "train_images"))
    (root / "train_images" / names[1]).write_bytes(b"not an image at all")
    (tmp_path / "secret.jpg").write_bytes((root / "train_images" / names[2]).read_bytes())
    os.unlink(root / "train_images" / names[2])
    os.symlink(tmp_path / "secret.jpg", root / "train_images" / names[2])
    arch = archive.Archive.open(str(root))  # sizes are fine: the listing cannot tell
    with pytest.raises(archive.ArchiveError, match="2 unreadable") as e:
        arch.check_images()
    assert f"{names[1]}: cannot read image header" in str(e.value)
    assert f"{names[2]}: resolves outside" in str(e.value)


def _store(root):
    m = np.zeros((8, 8), bool)
    m[2:5, 2:5] = True
    run = store.new_run_id()
    table = pa.Table.from_pylist([{"image_id": "a.png", "class_id": 1, "encoded_pixels": rle.encode(m), "score": 0.9,
                                   "area": int(m.sum()), "height": 8, "width": 8, "model_version": "m-1",
                                   "run_id": run}], schema=store.MASK_SCHEMA)
    store.commit(root, run, {"parts": {"masks": [store.write_part(root, "masks", run, table)], "errors": []},
                             "model_version": "m-1", "complete": True})


def test_export_coco_below_a_file_is_a_clear_error(tmp_path, capsys):
    root = str(tmp_path / "store")
    _store(root)
    (tmp_path / "somefile.txt").write_text("keep me")
    rc = main(["export-coco", "--store", root, "--out", str(tmp_path / "somefile.txt" / "out.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "somefile.txt is a file" in err, err
    assert (tmp_path / "somefile.txt").read_text() == "keep me"
    assert main(["export-coco", "--store", root, "--out", str(tmp_path / "ok.json")]) == 0


def test_csv_module_limit_is_not_the_bound(tmp_path):
    """A long but legitimate RLE line (over csv's default 128 KB field limit) still reads."""
    pairs = " ".join(f"{1 + 4 * i} 2" for i in range(30000))  # ~280 KB
    root = _archive(tmp_path, b"ImageId,ClassId,EncodedPixels\na.png,1," + pairs.encode() + b"\n")
    csv.field_size_limit(131072)
    arch = archive.Archive.open(str(root), check_images=False)
    assert arch.rle("a.png", 1) == pairs
