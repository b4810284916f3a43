"""Throughput of the foundation pieces, measured in one run (ratios are what to compare).

    .venv/bin/python bench/foundation.py [--images 300]

* synthetic archive: images/s written to a local folder at 256x1600 (JPEG encode included),
  1 worker and 2 workers;
* Kaggle RLE on a 256x1600 mask with Severstal-like runs: the vectorised codec vs the
  per-pixel loop of the Kaggle kernels (encode) and a per-run loop (decode).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np

from cam2seg import rle
from cam2seg.synthetic import synth


def loop_encode(mask):
    flat = mask.T.flatten()
    out, i, n = [], 0, len(flat)
    while i < n:
        if flat[i]:
            j = i
            while j < n and flat[j]:
                j += 1
            out += [i + 1, j - i]
            i = j
        else:
            i += 1
    return " ".join(map(str, out))


def loop_decode(text, h, w):
    flat = np.zeros(h * w, dtype=bool)
    t = text.split()
    for s, n in zip(t[0::2], t[1::2]):
        flat[int(s) - 1 : int(s) - 1 + int(n)] = True
    return flat.reshape(w, h).T


def best(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}; python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as d:
        rates = {}
        for workers in (1, 2):
            s = synth.write_archive(f"{d}/w{workers}", images=args.images, workers=workers, progress=None)
            rates[workers] = s["images_per_second"]
            print(f"synth 256x1600, {args.images} images, {workers} worker(s): {rates[workers]:.1f} images/s")
        print(f"synth 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")

    rng = np.random.default_rng(0)
    masks = [synth.generate(rng, classes=(3,)).masks[2] for _ in range(3)]
    masks.append(rng.random((256, 1600)) < 0.5)  # worst case: ~200k runs
    for name, m in zip(["class-3 mask", "class-3 mask", "class-3 mask", "random 50% mask"], masks):
        text = rle.encode(m)
        assert text == loop_encode(m) and (rle.decode(text, 256, 1600) == m).all()
        te, tl = best(lambda: rle.encode(m)), best(lambda: loop_encode(m), 2)
        td, tld = best(lambda: rle.decode(text, 256, 1600)), best(lambda: loop_decode(text, 256, 1600), 2)
        print(f"RLE {name} ({len(text.split()) // 2} runs): encode {te * 1e3:.2f} ms ({tl / te:.0f}x the loop), "
              f"decode {td * 1e3:.2f} ms ({tld / td:.1f}x the loop)")


if __name__ == "__main__":
    main()
