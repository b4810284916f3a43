"""Stage 4 for `ray job submit`: the same flags as `cam2seg evaluate` (it runs in the driver:
submit it with --entrypoint-num-gpus 1 on a cluster whose head has no GPU).

    ray job submit --entrypoint-num-gpus 1 --working-dir . -- python jobs/evaluate.py \
        --truth s3://bucket/archive --model s3://bucket/models/classifier-b0 \
        --store s3://bucket/labels/archive-cam --segmenter s3://bucket/models/unet-b0
"""

import sys

from cam2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
