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
