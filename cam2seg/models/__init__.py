"""The networks: the fold classifier (timm encoder + the paper's head), the segmenter (smp),
its loss, and :func:`~cam2seg.models.predict.load_predictor`, which turns any saved artifact
into maps and masks."""
