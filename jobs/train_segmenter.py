"""Stage 3 for `ray job submit`: the same flags as `cam2seg train-segmenter`.

    ray job submit --working-dir . -- python jobs/train_segmenter.py \
        --data s3://bucket/archive --masks s3://bucket/labels/night --out s3://bucket/models/unet \
        --config cluster/cam2seg.yaml
"""

import sys

from cam2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-segmenter", *sys.argv[1:]]))
