"""Fold training on Ray Train, shared by stage 1 (classifiers) and stage 3 (segmenters): the
fold runner, the per-worker loops and their shared pieces (checkpoints, SWA, data order)."""
