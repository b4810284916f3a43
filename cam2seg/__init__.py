"""cam2seg: image-level labels to segmentation masks."""
__version__ = "0.1.0"
