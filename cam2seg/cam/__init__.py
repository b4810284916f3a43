"""Class activation maps as pseudo-masks.

``compute_cams`` is the fast batched engine (GradCAM, GradCAM++ and their guided variants);
``library_cams`` runs pytorch-grad-cam for any of its methods, as the reference and for breadth.
"""

from .engine import CAM_METHODS, DEFAULT_METHOD, GUIDED_METHODS, METHODS, compute_cams, feature_maps_to_cams
from .guided import guided_backprop, guided_model, guided_saliency
from .library import LIBRARY_METHODS, find_feature_layer, library_cams

__all__ = ["METHODS", "GUIDED_METHODS", "CAM_METHODS", "DEFAULT_METHOD", "compute_cams", "feature_maps_to_cams", "guided_model", "guided_backprop",
           "guided_saliency", "LIBRARY_METHODS", "library_cams", "find_feature_layer"]
