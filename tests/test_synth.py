import hashlib
import os

import numpy as np
import pytest

from cam2seg.synthetic import maskstats, synth
from cam2seg.archive import Archive


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f == "synth.json":  # holds timings
                continue
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def test_same_seed_same_bytes_any_workers(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    synth.write_archive(a, images=70, height=32, width=128, seed=5, progress=None)
    synth.write_archive(b, images=70, height=32, width=128, seed=5, workers=2, progress=None)
    synth.write_archive(c, images=70, height=32, width=128, seed=6, progress=None)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_class_proportions_and_clean_images(tmp_path):
    n = 400
    out = str(tmp_path / "a")
    summary = synth.write_archive(out, images=n, height=32, width=128, seed=11, progress=None)
    arch = Archive.open(out)
    freq = arch.labels.mean(axis=0)
    # Severstal's share of images per class, from its class combinations, at 45% clean.
    combos = synth.CLASS_COMBINATIONS
    total = sum(combos.values())
    expected = np.array([sum(v for k, v in combos.items() if c in k) / total for c in (1, 2, 3, 4)]) * 0.55
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert (np.abs(freq - expected) <= 4 * sigma).all(), (freq, expected)
    clean = ~arch.labels.any(axis=1)
    assert abs(clean.mean() - 0.45) <= 4 * np.sqrt(0.45 * 0.55 / n)
    assert summary["clean_images"] == clean.sum()
    assert (arch.labels.sum(axis=1) >= 2).any()  # several classes on some images
    # Clean images have no mask rows; every labelled class has a non-empty mask inside the image.
    areas = arch.true_areas()
    assert (areas[clean] == 0).all()
    assert ((areas > 0) == arch.labels.astype(bool)).all()
    for iid in arch.image_ids[:40]:
        m = arch.masks(iid, (32, 128))
        assert m.shape == (4, 32, 128)
        assert not (m.sum(axis=0) > 1).any()  # classes never share a pixel


@pytest.mark.parametrize("classes", [(1,), (2,), (3,), (4,), (3, 4), (1, 2)])
def test_masks_are_exactly_the_changed_pixels(classes):
    for k in range(5):
        seed = [42, k, *classes]
        s = synth.generate(np.random.default_rng(seed), 128, 800, classes=classes)
        background, _ = synth._background(np.random.default_rng(seed), 128, 800)
        bg = np.clip(np.rint(background), 0, 255).astype(np.uint8)
        changed = s.image != bg
        union = s.masks.any(axis=0)
        assert not (changed & ~union).any(), "pixels changed outside the masks"
        assert changed[union].mean() > 0.8, "most mask pixels must look different"
        assert s.class_ids == sorted(classes)


def test_clean_image_is_background_only():
    s = synth.generate(np.random.default_rng(9), 64, 400, classes=())
    bg, _ = synth._background(np.random.default_rng(9), 64, 400)
    assert not s.masks.any()
    assert (s.image == np.clip(np.rint(bg), 0, 255).astype(np.uint8)).all()


@pytest.mark.parametrize("size", [(256, 1600), (128, 800)])
def test_geometry_medians_within_factor_two_of_real(size):
    h, w = size
    pairs = []
    for c in (1, 2, 3, 4):
        for k in range(50):
            s = synth.generate(np.random.default_rng([c, k, h]), h, w, classes=(c,))
            pairs.append((c, s.masks[c - 1]))
    summary = maskstats.summarise(maskstats.collect(pairs))
    ratios = maskstats.median_ratios(summary, h, w)
    for c, r in ratios.items():
        for metric, ratio in r.items():
            assert 0.5 <= ratio <= 2.0, f"class {c} {metric}: median ratio {ratio:.2f}"
    table = maskstats.format_comparison(summary, h, w)
    assert "<-- off" not in table


def test_bad_sizes_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least 32x64"):
        synth.write_archive(str(tmp_path / "x"), images=2, height=16, width=64, progress=None)
    with pytest.raises(ValueError, match="at least 1"):
        synth.write_archive(str(tmp_path / "x"), images=0, progress=None)


# --------------------------------------------------------------------------- C classes, names, colour
def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_default_archive_is_byte_identical_to_before_classes_names_colour(tmp_path):
    # Golden digests computed by running the ORIGINAL synth.py (git HEAD, before --classes,
    # --class-names and --color existed) on exactly these arguments; benchmarks and other tests
    # rely on the default archive keeping its bytes. The image digest hashes generate()'s raw
    # arrays (not the JPEGs, whose bytes depend on the Pillow/libjpeg build).
    out = str(tmp_path / "a")
    summary = synth.write_archive(out, images=24, height=32, width=200, seed=7, progress=None)
    assert _sha(os.path.join(out, "train.csv")) == "16dc8c4c466c506655726acd091e0e806273517ab9e4add333f96e51b2615033"
    assert _sha(os.path.join(out, "labels.csv")) == "a93498c9afbcabd3c7fba50e9d772cf0ff6e8e00e135d7c930186caf03e8f1b8"
    out = str(tmp_path / "c")
    synth.write_archive(out, images=20, height=64, width=400, seed=5, mix="balanced", progress=None)
    assert _sha(os.path.join(out, "train.csv")) == "4315888c09d26e03ce240973800d40748a11251753098001d2a2a23a9ea233aa"
    assert _sha(os.path.join(out, "labels.csv")) == "7c4349ee1b2cc2c20111b444d32c82a9f4b54348ff5c2e31eda7239d8a8c27ad"
    h = hashlib.sha256()
    for i in range(24):  # the images and masks of the first archive, as _make_chunk draws them
        s = synth.generate(np.random.default_rng([7, i]), 32, 200)
        h.update(s.image.tobytes())
        h.update(np.packbits(s.masks).tobytes())
    assert h.hexdigest() == "8c91191690f7479faf32fe4272104512e62f03e193f14e62958686c0d5b82176"
    # synth.json gained keys, but keeps Severstal's "1".."4" for the default archive.
    assert list(summary["images_per_class"]) == ["1", "2", "3", "4"]
    assert summary["classes"] == 4 and summary["class_names"] == ["1", "2", "3", "4"]
    assert summary["color"] is False and summary["color_only"] is False


@pytest.mark.parametrize("num_classes,names", [
    (1, ["defect"]),
    (3, ["pit", "streak", "scratch"]),
    (6, ["pit", "streak", "scratch", "blotch", "pit_2", "streak_2"]),
])
def test_named_archives_of_c_classes(tmp_path, num_classes, names):
    out = str(tmp_path / "a")
    # mix stays the default "severstal": it means "balanced" for C != 4 (every class shows up).
    summary = synth.write_archive(out, images=24, height=32, width=200, seed=3, clean_fraction=0.1,
                                  num_classes=num_classes, progress=None)
    wide = _read_csv(os.path.join(out, "labels.csv"))
    assert wide[0] == ["ImageId", *names]
    assert all(len(r) == 1 + num_classes for r in wide)
    long = _read_csv(os.path.join(out, "train.csv"))
    assert long[0] == ["ImageId", "ClassId", "EncodedPixels"]
    assert {r[1] for r in long[1:]} == set(names)  # ClassId holds the class name
    # train.csv and labels.csv agree, and every mask decodes at the image size.
    from cam2seg import rle

    labelled = {(r[0], names[j]) for r in wide[1:] for j, v in enumerate(r[1:]) if v == "1"}
    assert {(r[0], r[1]) for r in long[1:]} == labelled
    assert all(rle.decode(r[2], 32, 200).any() for r in long[1:])
    assert summary["class_mix"] == "balanced" and summary["classes"] == num_classes
    assert summary["class_names"] == names and list(summary["images_per_class"]) == names
    assert sum(summary["images_per_class"].values()) >= 24 * 0.9 * 0.8
    for c in range(1, num_classes + 1):
        s = synth.generate(np.random.default_rng([c, 1]), 32, 200, classes=(c,), num_classes=num_classes)
        assert s.image.shape == (32, 200) and s.image.dtype == np.uint8
        assert s.masks.shape == (num_classes, 32, 200) and s.masks.dtype == bool
        assert s.class_ids == [c]
    rngs = (np.random.default_rng(k) for k in range(200))
    drawn = {c for rng in rngs for c in synth.sample_classes(rng, 0.0, "severstal", num_classes)}
    assert drawn == set(range(1, num_classes + 1))


def test_class_ids_out_of_range_refused():
    with pytest.raises(ValueError, match="out of range 1..3"):
        synth.generate(np.random.default_rng(0), 32, 200, classes=(4,), num_classes=3)
    with pytest.raises(ValueError, match="1..16"):
        synth.generate(np.random.default_rng(0), 32, 200, classes=(), num_classes=17)


@pytest.mark.parametrize("first,later", [(1, 5), (2, 6), (3, 11), (4, 16)])
def test_later_classes_of_a_family_look_different(first, later):
    # Same seed, so the same geometry: only the look differs (class_look).
    a = synth.generate(np.random.default_rng([8, first]), 128, 800, classes=(first,), num_classes=16)
    b = synth.generate(np.random.default_rng([8, first]), 128, 800, classes=(later,), num_classes=16)
    bg, _ = synth._background(np.random.default_rng([8, first]), 128, 800)
    bg = np.clip(np.rint(bg), 0, 255)
    ma, mb = a.masks[first - 1], b.masks[later - 1]
    assert (ma == mb).all() and ma.any()
    da, db = a.image[ma] - bg[ma], b.image[mb] - bg[mb]
    assert not (b.image != bg)[~mb].any(), "pixels changed outside the masks"
    assert (b.image != bg)[mb].mean() > 0.8, "most mask pixels must look different"
    # The texture draws are the same too, so the later look is a per-pixel transform of the first.
    flip, checker = synth.class_look(later)[1:]
    sure = np.abs(da) >= 12  # rounding barely moves the ratio
    ratio = db[sure] / da[sure]
    if flip:  # the opposite brightness change
        assert np.sign(da.mean()) == -np.sign(db.mean()) and abs(db.mean()) > 8
    ratio = -ratio if flip else ratio
    assert (ratio > 0).mean() > 0.95
    if checker:  # a checkerboard: the change at full or about a third of its strength, cell by cell
        assert (np.abs(ratio - 0.35) < 0.15).mean() > 0.3 and (np.abs(ratio - 1) < 0.15).mean() > 0.3
    else:
        assert (np.abs(ratio - 1) < 0.15).mean() > 0.9


def _jpeg_roundtrip(image):
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(synth._encode_jpeg(image))).convert("RGB"))


def test_colour_archive_has_rgb_444_jpegs_whose_grey_is_the_grey_image(tmp_path):
    from PIL import Image, JpegImagePlugin

    out = str(tmp_path / "a")
    summary = synth.write_archive(out, images=8, height=32, width=200, seed=2, color=True, progress=None)
    assert _read_csv(os.path.join(out, "labels.csv"))[0] == ["ImageId", "pit", "streak", "scratch", "blotch"]
    assert summary["color"] is True
    for f in sorted(os.listdir(os.path.join(out, "train_images"))):
        with Image.open(os.path.join(out, "train_images", f)) as im:
            assert im.mode == "RGB" and JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
            assert np.asarray(im).shape == (32, 200, 3)
    # The luma of a colour image is the grey image of the same seed (same defects, same
    # background), so a grey model sees what it saw before; the hue is extra information.
    import cv2

    for k in range(4):
        grey = synth.generate(np.random.default_rng([4, k]), 64, 400, classes=(k + 1,))
        rgb = synth.generate(np.random.default_rng([4, k]), 64, 400, classes=(k + 1,), color=True)
        assert rgb.image.shape == (64, 400, 3) and rgb.image.dtype == np.uint8
        assert (grey.masks == rgb.masks).all()
        assert np.abs(cv2.cvtColor(rgb.image, cv2.COLOR_RGB2GRAY).astype(int) - grey.image).max() <= 1
    # The background is tinted but not a defect: a clean colour image differs from grey only a little.
    s = synth.generate(np.random.default_rng(1), 64, 400, classes=(), color=True)
    spread = s.image.astype(int).max(axis=2) - s.image.astype(int).min(axis=2)
    assert not s.masks.any() and np.median(spread) < 16


def test_color_only_classes_differ_in_hue_not_in_grey():
    import cv2

    # Each pair of images shares its seed, so the two classes get the same geometry and the
    # same brightness change (color_only draws identically for every class); only the hue
    # differs. Unpaired seeds would compare different backgrounds (base brightness 85-130).
    grey, colour = {1: [], 2: []}, {1: [], 2: []}
    for k in range(4):
        for c in (1, 2):
            s = synth.generate(np.random.default_rng([3, k]), 64, 400, classes=(c,), num_classes=4, color_only=True)
            rgb = _jpeg_roundtrip(s.image)  # as stored: the property must survive JPEG
            m = s.masks[c - 1]
            grey[c].append(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[m])
            colour[c].append(rgb[m].astype(float))
    g1, g2 = (np.concatenate(grey[c]).mean() for c in (1, 2))
    c1, c2 = (np.concatenate(colour[c]).mean(axis=0) for c in (1, 2))
    assert abs(g1 - g2) < 3, (g1, g2)
    assert np.abs(c1 - c2).max() > 15, (c1, c2)
    # Every class is the one family: same masks for the same seed.
    a = synth.generate(np.random.default_rng(5), 64, 400, classes=(1,), num_classes=4, color_only=True)
    b = synth.generate(np.random.default_rng(5), 64, 400, classes=(3,), num_classes=4, color_only=True)
    assert (a.masks[0] == b.masks[2]).all() and a.masks[0].any()


@pytest.mark.parametrize("names,problem", [
    (["pit", "scratch"], "2 class name"),
    (["pit", "pit", "stain"], "unique"),
    (["pit", "Pit", "stain"], "unique"),
    (["pit", "", "stain"], "is empty"),
    (["pit", "scr\tatch", "stain"], "non-printable"),
    (["pit", "a,b", "stain"], "comma"),
    (["pit", " scratch", "stain"], "spaces"),
    (["pit", "ImageId", "stain"], "column name"),
    (["3", "scratch", "stain"], "would read as class 3"),
])
def test_bad_class_names_refused(tmp_path, names, problem):
    out = tmp_path / "a"
    with pytest.raises(ValueError, match=problem):
        synth.write_archive(str(out), images=2, height=32, width=200, num_classes=3, class_names=names, progress=None)
    assert not out.exists()  # refused before anything was written
    assert synth.check_class_names(["1", "scratch", "stain"], 3) == ["1", "scratch", "stain"]  # 1 is class 1's
    assert synth.check_class_names("pit,scratch,stain", 3) == ["pit", "scratch", "stain"]


def test_cli_synth_classes_names_colour(tmp_path, capsys):
    from PIL import Image

    from cam2seg import cli

    out = tmp_path / "a"
    rc = cli.main(["synth", str(out), "--classes", "3", "--class-names", "pit,scratch,stain", "--color",
                   "--images", "8", "--height", "32", "--width", "200"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert (out / "labels.csv").read_text().splitlines()[0] == "ImageId,pit,scratch,stain"
    assert {r[1] for r in _read_csv(out / "train.csv")[1:]} <= {"pit", "scratch", "stain"}
    assert "pit: " in stdout and "stain: " in stdout and "RGB" in stdout
    with Image.open(next((out / "train_images").iterdir())) as im:
        assert np.asarray(im).shape == (32, 200, 3)
    rc = cli.main(["synth", str(tmp_path / "b"), "--classes", "3", "--class-names", "pit,pit,stain",
                   "--images", "8", "--height", "32", "--width", "200"])
    err = capsys.readouterr().err
    assert rc == 2 and "error" in err and "unique" in err and not (tmp_path / "b").exists()
