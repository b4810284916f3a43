"""Out-of-fold scoring against true masks: histograms, post-processing tuning, the paper's
Table 2 (CAM masks) and Table 3 (stored masks and segmenters)."""
