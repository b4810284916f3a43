"""Class activation maps as pseudo-masks.

``compute_cams`` is the fast batched engine (GradCAM, GradCAM++); ``library_cams`` runs
pytorch-grad-cam for any of its methods, as the reference and for breadth.
"""

from .engine import METHODS, compute_cams, feature_maps_to_cams
from .library import LIBRARY_METHODS, find_feature_layer, library_cams

__all__ = ["METHODS", "compute_cams", "feature_maps_to_cams", "LIBRARY_METHODS", "library_cams", "find_feature_layer"]
