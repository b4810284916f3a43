"""CAM throughput and peak memory: the fast engine vs pytorch-grad-cam vs the forward-only bound.

    .venv/bin/python bench/cam_throughput.py [--size 256x1600] [--batch 4] [--encoder efficientnet_b0]
                                             [--device cpu|cuda] [--repeat 2] [--variants-per-pass 1|all]

All 4 class maps per image; the library needs one call per class with one target per image.
Forward-only bound: a no-grad forward of the same batch (x6 images with aug smoothing, which is
what the fast engine feeds through the encoder). Each measurement runs in its own process so
peak memory (max RSS on CPU, max allocated on CUDA) belongs to that engine alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def measure(kind: str, size, batch: int, encoder: str, device: str, aug: bool, repeat: int,
            per_pass: int | None) -> dict:
    import resource

    import torch

    from cam2seg.cam import compute_cams, library_cams
    from cam2seg.models.classifier import Classifier

    torch.manual_seed(0)
    model = Classifier(encoder).eval().to(device)
    x = torch.randn(batch, 3, *size, device=device)
    n_fwd = batch * (6 if aug else 1)
    xf = torch.randn(n_fwd, 3, *size, device=device)

    def run():
        if kind == "fast":
            compute_cams(model, x, "gradcam++", aug, variants_per_pass=per_pass)
        elif kind == "library":
            library_cams(model, x, "gradcam++", aug)
        else:
            with torch.no_grad():
                model(xf)
        if device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"images_per_s": batch / min(times), "peak_bytes": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256x1600")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--encoder", default="efficientnet_b0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variants-per-pass", default="1",
                    help="aug variants per encoder pass of the fast engine: 1 (default) .. 6, or all")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    per_pass = None if args.variants_per_pass == "all" else int(args.variants_per_pass)
    if args.one:
        kind, aug = args.one.split(",")
        print(json.dumps(measure(kind, size, args.batch, args.encoder, args.device, aug == "1", args.repeat,
                                 per_pass)))
        return
    import torch

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}; "
          f"{args.encoder} at {args.size}, batch {args.batch}, GradCAM++, 4 classes, "
          f"aug variants per pass: {args.variants_per_pass}")
    for aug in (False, True):
        res = {}
        for kind in ("fast", "library", "forward"):
            out = subprocess.run([sys.executable, __file__, "--one", f"{kind},{int(aug)}", "--size", args.size,
                                  "--batch", str(args.batch), "--encoder", args.encoder, "--device", args.device,
                                  "--repeat", str(args.repeat), "--variants-per-pass", args.variants_per_pass],
                                 capture_output=True, text=True, check=True)
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        f, lib, fwd = res["fast"], res["library"], res["forward"]
        # the forward run pushed 6x the images through with aug smoothing, and its rate is
        # already counted per original image: images/s if CAMs cost only that forward pass
        bound = fwd["images_per_s"]
        print(f"aug_smooth={aug}: fast {f['images_per_s']:.3f} img/s, library {lib['images_per_s']:.4f} img/s, "
              f"forward-only bound {bound:.3f} img/s")
        print(f"  fast / library = {f['images_per_s'] / lib['images_per_s']:.1f}x; "
              f"fast / bound = {f['images_per_s'] / bound:.2f}x")
        print(f"  peak memory: fast {f['peak_bytes'] / 2**20:.0f} MiB, library {lib['peak_bytes'] / 2**20:.0f} MiB, "
              f"forward {fwd['peak_bytes'] / 2**20:.0f} MiB; fast / library = {f['peak_bytes'] / lib['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
