"""The nightly run for `ray job submit` and schedulers: the same flags as `cam2seg nightly`.

Labels only the images no earlier run labeled; with nightly.retrain_after > 0 it also retrains
the segmenter once that many new labels piled up. Paths come from flags or the config's
`nightly` section:

    ray job submit --working-dir . -- python jobs/nightly.py \
        --model s3://bucket/models/classifier-b0 --images s3://bucket/archive/train_images \
        --out s3://bucket/labels/nightly --config s3://bucket/config/cam2seg.yaml
"""

import sys

from cam2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
