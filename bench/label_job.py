"""Labeling job throughput: the Ray Data job vs the in-process engine, 1 -> 2 actors, and the
cost of refining the maps (contrast + PAR, the default of new cards) against none.

    .venv/bin/python bench/label_job.py [--images 96] [--size 128x800] [--encoder mobilenetv3_small_100]
                                        [--model-size 128x800] [--no-aug] [--device-note TEXT]

Same images, same random-init model (2 folds), same post-processing. The in-process figure is
read + decode + CAM + RLE in one process with one torch thread (what one actor of one CPU does);
the job figures are wall time of ``label_archive`` from listing to the final commit, with
actors of one CPU each (Ray is given one logical CPU more than the actors take, for the
I/O-bound read and write tasks). Ratios come from one run: this machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--size", default="128x800", help="archive image size")
    ap.add_argument("--model-size", default="128x800", help="model input size")
    ap.add_argument("--encoder", default="mobilenetv3_small_100")
    ap.add_argument("--no-aug", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import ray
    import torch

    from cam2seg import preprocess, io
    from cam2seg.synthetic import synth
    from cam2seg.models.predict import load_predictor
    from cam2seg.config import LabelConfig, parse_size
    from cam2seg.pipeline.label import label_archive, label_images
    from cam2seg.refine import DEFAULT_REFINE
    from conftest import write_random_artifact

    h, w = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="cam2seg-bench-label-")
    try:
        synth.write_archive(f"{work}/a", images=args.images, height=h, width=w, seed=0, workers=2, progress=None)
        images = f"{work}/a/train_images"
        write_random_artifact(f"{work}/model", args.encoder, size=parse_size(args.model_size), image_size=(h, w))
        aug = not args.no_aug

        torch.set_num_threads(1)
        predictor = load_predictor(f"{work}/model", "cpu", aug_smooth=aug)
        card = predictor.card
        keys = io.list_images(images)
        label_images(predictor, preprocess.load_images([f"{images}/{keys[0]}"], tuple(card.input_size)),
                     [(h, w)])  # warm-up
        def in_process(p) -> float:
            t0 = time.perf_counter()
            for s in range(0, len(keys), args.batch):
                batch = keys[s : s + args.batch]
                imgs = preprocess.load_images([f"{images}/{k}" for k in batch], tuple(card.input_size), threads=1)
                label_images(p, imgs, [(h, w)] * len(batch))
            return len(keys) / (time.perf_counter() - t0)

        inproc = in_process(predictor)
        inproc_refined = in_process(load_predictor(f"{work}/model", "cpu", aug_smooth=aug, refine=DEFAULT_REFINE))

        rates = {}
        for actors, refine in ((1, None), (2, None), ("1, refined", DEFAULT_REFINE)):
            n = 1 if refine is not None else actors
            ray.init(num_cpus=n + 1, include_dashboard=False, logging_level="ERROR")
            try:
                cfg = LabelConfig(actors=n, cpus_per_actor=1, batch_size=args.batch, read_batch=args.batch,
                                  images_per_file=64, aug_smooth=aug, refine=refine)
                s = label_archive(f"{work}/model", images, f"{work}/store-{actors}", cfg)
                assert s["labeled"] == len(keys), s
                rates[actors] = s["images_per_s"]
            finally:
                ray.shutdown()
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.encoder} (2 folds) at {args.model_size}, "
              f"archive {args.images} images {args.size}, aug_smooth={aug}, batch {args.batch}")
        print(f"in-process engine (1 thread, read+CAM+RLE): {inproc:.2f} images/s")
        print(f"Ray Data job, 1 actor: {rates[1]:.2f} images/s  -> job / in-process = {rates[1] / inproc:.2f}")
        print(f"Ray Data job, 2 actors: {rates[2]:.2f} images/s -> 2 / 1 actors = {rates[2] / rates[1]:.2f}x")
        print(f"refined (contrast + PAR): in-process {inproc_refined:.2f} images/s -> refined / unrefined = "
              f"{inproc_refined / inproc:.2f}; job, 1 actor {rates['1, refined']:.2f} images/s -> "
              f"{rates['1, refined'] / rates[1]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
