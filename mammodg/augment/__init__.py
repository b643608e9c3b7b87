"""Input operations: pure tf functions of explicit arguments (crops, geometry, intensity, style choice
and blending, patches, evaluation tiles), tested eagerly and inside ``tf.data.Dataset.map``."""
from mammodg.augment.crops import augment, breast_point, crop_box, crop_input
from mammodg.augment.pairs import pair_decoder
from mammodg.augment.patches import patch_decoder
from mammodg.augment.styles import (METHODS, PAIR_TYPES, choose, diversified_style, multi_style, pair_types,
                                    positive_pairs, styled, uses_styles, view_sides, views_per_sample)
from mammodg.augment.tiles import evaluation_tiles

__all__ = ["METHODS", "PAIR_TYPES", "augment", "breast_point", "choose", "crop_box", "crop_input", "diversified_style",
           "evaluation_tiles", "multi_style", "pair_decoder", "pair_types", "patch_decoder", "positive_pairs", "styled",
           "uses_styles", "view_sides", "views_per_sample"]
