"""Stage 1 for `ray job submit`: the same flags as `cam2seg train-classifiers`.

    ray job submit --working-dir . -- python jobs/train_classifiers.py \
        --data s3://bucket/archive --out s3://bucket/models/b0 --config cluster/cam2seg.yaml
"""

import sys

from cam2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-classifiers", *sys.argv[1:]]))
