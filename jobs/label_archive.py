"""Stage 2 for `ray job submit`: the same flags as `cam2seg label`.

    ray job submit --working-dir . -- python jobs/label_archive.py \
        --model s3://bucket/models/b0 --images s3://bucket/new-images --out s3://bucket/labels --incremental
"""

import sys

from cam2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
