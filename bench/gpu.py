"""GPU figures for BENCHMARKS.md in one process, without Ray (the lent GPU machine has no Ray:
its wheel is larger than what a call may carry, see bench/gpu.sh).

    PYTHONPATH=. python bench/gpu.py [--size 256x1600] [--encoder efficientnet_b0] [--batch 16]
                                     [--images 64] [--device cuda] [--steps 10]

1. **Training step**, both stages' real models and losses (the paper's classifier; smp's U-Net
   with ``tu-<encoder>``), images/s of forward + backward + Adam step on a device-resident
   batch: fp32, bf16 autocast, and bf16 with ``channels_last``. ``channels_last`` is used only
   if its fp32 forward equals the contiguous one (max abs difference printed).
2. **The data pipeline's share.** Images/s of what feeds a step on the CPU (PNG read, decode,
   grey, resize: ``preprocess.load_images`` over ``--load-threads`` threads) against the step's
   images/s: below 1x, a loop on one GPU waits on decoding (the training loop itself records
   that wait per epoch as ``data_wait_seconds``, in Ray runs).
3. **Labeling**, in process (what one labeling actor does on one GPU): read + decode + CAM +
   refinement + RLE of ``--images`` synthetic images at ``--size`` with a random-init 2-fold
   classifier, with and without the default refinement.
4. **The CAM engine against pytorch-grad-cam** is bench/cam_throughput.py (run by bench/gpu.sh).

Random-init weights throughout: speed does not depend on what a model has learned.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(model, loss_fn, x, y, device, amp: bool, steps: int) -> float:
    """Training images/s of ``steps`` optimizer steps (after two warm-up steps)."""
    import torch

    from cam2seg.train.loop import autocast

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    for i in range(steps + 2):
        if i == 2:
            _sync(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            out = model(x)
        loss_fn(out.float(), y).backward()
        opt.step()
    _sync(device)
    return len(x) * steps / (time.perf_counter() - t0)


def training(args, device) -> dict:
    import torch
    import torch.nn.functional as F

    from cam2seg.models.classifier import create_classifier
    from cam2seg.models.losses import segmentation_loss
    from cam2seg.models.segmenter import create_segmenter

    h, w = args.size
    x = torch.randn(args.batch, 3, h, w, device=device)
    stages = {
        "classifier": (lambda: create_classifier(args.encoder), lambda o, t: F.binary_cross_entropy_with_logits(o, t),
                       (torch.rand(args.batch, 4, device=device) > 0.5).float()),
        "segmenter": (lambda: create_segmenter("Unet", f"tu-{args.encoder}"), segmentation_loss,
                      (torch.rand(args.batch, 4, h, w, device=device) > 0.9).float()),
    }
    print(f"\n## Training step at {h}x{w}, {args.encoder}, batch {args.batch}, {device}"
          f"{'' if device.type == 'cuda' else ' (autocast is CUDA-only: the bf16 columns run fp32 here)'}")
    print(f"{'stage':10s} {'fp32 img/s':>10s} {'bf16 img/s':>10s} {'bf16+CL img/s':>13s} {'CL max |diff|':>13s}")
    rates = {}
    for name, (make, loss_fn, y) in stages.items():
        torch.manual_seed(0)
        model = make().to(device)
        with torch.no_grad():
            model.eval()
            ref = model(x[:2]).float()
            model_cl = model.to(memory_format=torch.channels_last)
            diff = float((model_cl(x[:2].contiguous(memory_format=torch.channels_last)).float() - ref).abs().max())
            model = model_cl.to(memory_format=torch.contiguous_format)
        fp32 = step_rate(model, loss_fn, x, y, device, False, args.steps)
        bf16 = step_rate(model, loss_fn, x, y, device, device.type == "cuda", args.steps)
        cl_ok = diff <= 1e-3 * max(1.0, float(ref.abs().max()))
        cl = float("nan")
        if cl_ok:
            model = model.to(memory_format=torch.channels_last)
            cl = step_rate(model, loss_fn, x.contiguous(memory_format=torch.channels_last), y, device,
                           device.type == "cuda", args.steps)
        rates[name] = max(bf16, cl if cl_ok else 0.0)
        print(f"{name:10s} {fp32:10.1f} {bf16:10.1f} {cl:13.1f} {diff:13.2e}{'' if cl_ok else '  (CL not used)'}",
              flush=True)
        del model
    return rates


def pipeline(args, work: str, rates: dict) -> None:
    from cam2seg import io, preprocess

    h, w = args.size
    images = f"{work}/a/train_images"
    urls = [f"{images}/{k}" for k in io.list_images(images)]
    preprocess.load_images(urls[: args.batch], (h, w), threads=args.load_threads)  # warm the page cache
    t0 = time.perf_counter()
    for s in range(0, len(urls), args.batch):
        preprocess.load_images(urls[s : s + args.batch], (h, w), threads=args.load_threads)
    rate = len(urls) / (time.perf_counter() - t0)
    print(f"\n## Data pipeline: read + decode + resize of {len(urls)} PNGs at {h}x{w}, "
          f"{args.load_threads} threads: {rate:.1f} images/s")
    for name, r in rates.items():
        print(f"{name}: decode / training step = {rate / r:.2f}x (below 1x the step waits on decoding)")


def labeling(args, work: str, device) -> None:
    import torch

    from cam2seg import io, preprocess
    from cam2seg.models.predict import load_predictor
    from cam2seg.pipeline.label import label_images
    from cam2seg.refine import DEFAULT_REFINE
    from conftest import write_random_artifact

    h, w = args.size
    images = f"{work}/a/train_images"
    keys = io.list_images(images)
    write_random_artifact(f"{work}/model", args.encoder, size=(h, w), image_size=(h, w))
    print(f"\n## Labeling in process on {device}: {len(keys)} images at {h}x{w}, {args.encoder}, 2 folds, "
          f"aug smoothing, batch {args.label_batch}")
    out = {}
    for name, refine in (("no refinement", None), ("default refinement", DEFAULT_REFINE)):
        p = load_predictor(f"{work}/model", str(device), aug_smooth=True, refine=refine)
        size = tuple(p.card.input_size)
        label_images(p, preprocess.load_images([f"{images}/{keys[0]}"], size), [(h, w)])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for s in range(0, len(keys), args.label_batch):
            batch = keys[s : s + args.label_batch]
            imgs = preprocess.load_images([f"{images}/{k}" for k in batch], size, threads=args.load_threads)
            label_images(p, imgs, [(h, w)] * len(batch))
        _sync(device)
        out[name] = len(keys) / (time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        print(f"{name:20s} {out[name]:8.1f} images/s (peak GPU memory {peak:.0f} MiB)", flush=True)
    print(f"refined / not refined = {out['default refinement'] / out['no refinement']:.2f}x (goal >= 0.7x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256x1600")
    ap.add_argument("--encoder", default="efficientnet_b0", help="timm name (the segmenter uses tu-<name>)")
    ap.add_argument("--batch", type=int, default=16, help="training batch")
    ap.add_argument("--label-batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=64, help="synthetic images to decode and label")
    ap.add_argument("--load-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", nargs="*", default=[], choices=["training", "pipeline", "labeling"])
    args = ap.parse_args()

    import torch

    from cam2seg.config import parse_size
    from cam2seg.synthetic import synth

    args.size = parse_size(args.size)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
        torch.backends.cudnn.benchmark = True
    print(f"CPU threads: {os.cpu_count()}")
    work = tempfile.mkdtemp(prefix="c2s-gpu-")
    h, w = args.size
    synth.write_archive(f"{work}/a", images=args.images, height=h, width=w, seed=0, workers=min(8, os.cpu_count() or 1),
                        progress=None)
    try:
        rates = {} if "training" in args.skip else training(args, device)
        if "pipeline" not in args.skip:
            pipeline(args, work, rates)
        if "labeling" not in args.skip:
            labeling(args, work, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
