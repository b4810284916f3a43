"""Check that the installed environment imports and report versions: ``python -m cam2seg.doctor``.

Run by ``make`` after installing, so a broken install (say, an OpenCV wheel that needs a
system libGL, or clashing botocore pins) fails there with a clear message, not mid-pipeline.
"""

from __future__ import annotations

import importlib
import sys

MODULES = [
    ("numpy", "numpy"), ("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"),
    ("pytorch_grad_cam", "grad-cam"), ("segmentation_models_pytorch", "segmentation-models-pytorch"),
    ("albumentations", "albumentations"), ("cv2", "opencv"), ("ray", "ray"), ("ray.data", "ray[data]"),
    ("ray.train", "ray[train]"), ("pyarrow", "pyarrow"), ("fsspec", "fsspec"), ("s3fs", "s3fs"),
    ("safetensors", "safetensors"), ("iterstrat", "iterative-stratification"), ("sklearn", "scikit-learn"),
    ("scipy", "scipy"), ("PIL", "pillow"), ("pydantic", "pydantic"), ("yaml", "pyyaml"),
]


def main() -> int:
    failed = []
    for module, dist in MODULES:
        try:
            m = importlib.import_module(module)
            print(f"ok   {dist:<28} {getattr(m, '__version__', '')}")
        except Exception as e:  # report every broken import, not just the first
            failed.append(dist)
            print(f"FAIL {dist:<28} {type(e).__name__}: {e}")
    if failed:
        print(f"cam2seg doctor: {len(failed)} package(s) failed to import: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("cam2seg doctor: environment OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
