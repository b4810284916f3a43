import numpy as np
import pytest

from cam2seg import rle


def naive_encode(mask):
    """The Kaggle kernels' reference encoder (loop over pixels), for cross-checking."""
    flat = mask.T.flatten()
    out, i = [], 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            out += [i + 1, j - i]
            i = j
        else:
            i += 1
    return " ".join(map(str, out))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (256, 1600), (7, 2)])
def test_empty_and_full(shape):
    h, w = shape
    empty = np.zeros(shape, bool)
    assert rle.encode(empty) == ""
    assert not rle.decode("", h, w).any()
    full = np.ones(shape, bool)
    assert rle.encode(full) == f"1 {h * w}"
    assert rle.decode(f"1 {h * w}", h, w).all()


def test_column_major_numbering_and_corners():
    h, w = 4, 3
    m = np.zeros((h, w), bool)
    m[0, 0] = True  # pixel 1
    assert rle.encode(m) == "1 1"
    m[:] = False
    m[h - 1, 0] = True  # bottom of the first column: pixel 4
    assert rle.encode(m) == "4 1"
    m[:] = False
    m[0, 1] = True  # top of the second column: pixel h + 1
    assert rle.encode(m) == "5 1"
    m[:] = False
    m[h - 1, w - 1] = True  # last pixel
    assert rle.encode(m) == f"{h * w} 1"
    for r in ("1 1", "4 1", "5 1", "12 1"):
        assert rle.encode(rle.decode(r, h, w)) == r


def test_run_across_column_boundary():
    h, w = 4, 3
    m = np.zeros((h, w), bool)
    m[2:, 0] = True
    m[:2, 1] = True  # one run: pixels 3..6 cross from column 0 into column 1
    assert rle.encode(m) == "3 4"
    assert (rle.decode("3 4", h, w) == m).all()


def test_random_severstal_sized_mask_round_trip_and_matches_reference():
    rng = np.random.default_rng(0)
    m = rng.random((256, 1600)) < 0.5
    text = rle.encode(m)
    assert (rle.decode(text, 256, 1600) == m).all()
    small = rng.random((17, 23)) < 0.4
    assert rle.encode(small) == naive_encode(small)


def test_encode_many_and_decode_many_agree_with_single():
    rng = np.random.default_rng(1)
    masks = rng.random((6, 9, 11)) < 0.3
    masks[2] = False
    masks[4] = True
    texts = rle.encode_many(masks)
    assert texts == [rle.encode(m) for m in masks]
    assert texts[2] == "" and texts[4] == "1 99"
    assert (rle.decode_many(texts, 9, 11) == masks).all()
    assert rle.encode_many(np.zeros((0, 4, 4), bool)) == []


def test_area_without_decoding():
    assert rle.area("1 3 10 2", 5, 5) == 5
    assert rle.area("", 5, 5) == 0


def test_none_and_nan_are_empty():
    assert not rle.decode(None, 2, 2).any()
    assert not rle.decode(float("nan"), 2, 2).any()


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2 3", "odd number"),
        ("1 2.5", "non-integer"),
        ("a 2", "non-integer"),
        ("0 2", "below 1"),
        ("-3 2", "below 1"),
        ("1 0", "length 0"),
        ("5 -1", "length -1"),
        ("23 3", "past the image"),
        ("24 2", "past the image"),
        ("10 2 3 1", "out of order"),
        ("1 5 3 1", "overlaps"),
    ],
)
def test_malformed_rejected_with_reason(text, message):
    with pytest.raises(rle.RLEError, match=message):
        rle.decode(text, 4, 6)


def test_touching_runs_are_valid():
    m = rle.decode("1 2 3 2", 2, 3)
    assert m.sum() == 4


def test_decode_many_names_the_bad_mask():
    with pytest.raises(rle.RLEError, match="mask 1"):
        rle.decode_many(["1 1", "1 1 1"], 2, 2)


def test_bad_shapes():
    with pytest.raises(ValueError):
        rle.encode(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError):
        rle.decode("1 1", 0, 5)
