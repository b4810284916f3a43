"""How reproducible stage 1 is: the same preset trained again, under another CPU kernel set, and
over seeds. Each training is a real ``cam2seg train-classifiers`` run (own local Ray) on the
preset's synthetic archive; the table shows out-of-fold ROC-AUC per class and whether the
weights came out identical (the hashes of the fold weight files in the card).

    .venv/bin/python bench/reproducibility.py [--preset small] [--seeds 0,1,2] [--repeat] [--isa avx2] \
        [--set classifier.plateau_epochs=6 ...]

``--repeat`` trains seed 0 a second time on this machine; ``--isa avx2`` trains seed 0 with
PyTorch's and oneDNN's kernels capped at AVX2 (``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``),
as on a machine without AVX-512: a stand-in for "a second machine" that this one can run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources

import yaml


def _cli() -> list[str]:
    return [sys.executable, "-m", "cam2seg"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeat", action="store_true", help="train seed 0 twice")
    ap.add_argument("--isa", choices=["avx2", "default"], default=None, help="also train seed 0 with this kernel cap")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, deleted)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                    help="override one preset value (a recipe to compare), e.g. classifier.augment=[hflip,vflip]")
    args = ap.parse_args()
    preset = yaml.safe_load(resources.files("cam2seg").joinpath("configs", f"{args.preset}.yaml").read_text())
    for item in args.set:
        path, _, value = item.partition("=")
        section, _, key = path.partition(".")
        if not key or not value:
            ap.error(f"--set wants SECTION.KEY=VALUE, got {item!r}")
        preset.setdefault(section, {})[key] = yaml.safe_load(value)
    work = args.keep or tempfile.mkdtemp(prefix="cam2seg-bench-repro-")
    cfg_path = os.path.join(work, "preset.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(preset, f)
    s = preset.get("synth", {})
    archive = os.path.join(work, "archive")
    try:
        if not os.path.exists(os.path.join(archive, "train.csv")):
            subprocess.run([*_cli(), "synth", archive, "--config", cfg_path], check=True, stdout=subprocess.DEVNULL)
        runs = [(f"seed {seed}", seed, {}) for seed in (int(x) for x in args.seeds.split(","))]
        if args.repeat:
            runs.append(("seed 0, again", 0, {}))
        if args.isa == "avx2":
            runs.append(("seed 0, AVX2 kernels", 0, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}))
        results = []
        for name, seed, env in runs:
            out = os.path.join(work, f"model-{len(results)}")
            t0 = time.perf_counter()
            proc = subprocess.run([*_cli(), "train-classifiers", "--data", archive, "--out", out, "--config", cfg_path,
                                   "--seed", str(seed), "--force"], env={**os.environ, **env},
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name}: train-classifiers failed ({proc.returncode})")
            card = json.load(open(os.path.join(out, "model.json")))
            folds = [round(float(f.get("val_loss", float("nan"))), 4) for f in card["metrics"]["folds"]]
            fold_auc = [f.get("auc") for f in card["metrics"]["folds"]]
            # the weight files' hashes: the card's version also covers timings in its history
            weights = "-".join(card["files"][f][:8] for f in card["fold_files"])
            results.append((name, seed, card["metrics"]["oof_auc"], weights, folds, time.perf_counter() - t0))
            print(f"{name}: OOF AUC {card['metrics']['oof_auc']}, weights {results[-1][3]}, fold val_loss {folds}, "
                  f"fold AUC {fold_auc}, {results[-1][5]:.0f}s", flush=True)
        classes = list(results[0][2])
        print(f"\npreset {args.preset!r} ({s.get('images')} images {s.get('height')}x{s.get('width')}), "
              f"classifier {preset['classifier'].get('encoder')}, {preset['classifier'].get('epochs')} epochs"
              + (f", with {' '.join(args.set)}" if args.set else ""))
        print("| run | " + " | ".join(f"class {c}" for c in classes) + " | mean | fold val_loss | weights |")
        print("|---" * (len(classes) + 4) + "|")
        base = results[0][3]
        for name, _, auc, version, folds, _ in results:
            same = "identical to seed 0's" if version == base and name != results[0][0] else version
            print(f"| {name} | " + " | ".join(f"{auc[c]:.3f}" for c in classes)
                  + f" | {statistics.mean(auc.values()):.3f} | {folds} | {same} |")
        seeded = [r for r in results if r[0].startswith("seed ") and "," not in r[0]]
        if len(seeded) > 1:
            cells = [f"{statistics.mean(r[2][c] for r in seeded):.3f} ± {statistics.stdev(r[2][c] for r in seeded):.3f}"
                     for c in classes]
            means = [statistics.mean(r[2].values()) for r in seeded]
            print(f"| mean ± sd over {len(seeded)} seeds | " + " | ".join(cells)
                  + f" | {statistics.mean(means):.3f} ± {statistics.stdev(means):.3f} | | |")
            low = [(r[0], c, r[2][c]) for r in seeded for c in classes if r[2][c] < 0.95]
            print(f"classes below 0.95 OOF AUC: {low or 'none'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
