"""Training throughput of candidate encoders on one CPU thread (the per-fold setting on a
2-core machine), with the paper's head; ratios against EfficientNet-b0 from the same run.

    .venv/bin/python bench/classifier_cpu.py [--sizes 64x400,128x800] [--batch 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from cam2seg.models.classifier import Classifier

ENCODERS = ["efficientnet_b0", "mobilenetv3_small_100", "mobilenetv3_large_100", "resnet10t", "regnetx_002"]


def train_rate(name: str, size: tuple[int, int], batch: int, steps: int = 3) -> tuple[float, tuple]:
    m = Classifier(name).train()
    opt = torch.optim.Adam(m.parameters())
    x = torch.randn(batch, 3, *size)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
    rate = batch * steps / (time.perf_counter() - t0)
    with torch.no_grad():
        feats = m.eval().forward_features(x[:1]).shape[1:]
    return rate, tuple(feats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64x400,128x800")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for s in args.sizes.split(","):
        size = tuple(int(v) for v in s.split("x"))
        base = None
        for name in ENCODERS:
            rate, feats = train_rate(name, size, args.batch)
            base = base or rate
            print(f"{s:>8} {name:<24} {rate:6.1f} images/s train, {rate / base:4.2f}x b0, features {feats}")


if __name__ == "__main__":
    main()
