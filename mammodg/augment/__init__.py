"""Input operations: pure tf functions of explicit arguments (crops, geometry, intensity, style choice
and blending, patches, evaluation tiles), tested eagerly and inside ``tf.data.Dataset.map``."""
from mammodg.augment.crops import augment, breast_point, crop_box, crop_input
from mammodg.augment.pairs import pair_decoder
from mammodg.augment.patches import patch_decoder
from mammodg.augment.styles import METHODS, choose, multi_style, positive_pairs, styled, views_per_sample
from mammodg.augment.tiles import evaluation_tiles

__all__ = ["METHODS", "augment", "breast_point", "choose", "crop_box", "crop_input", "evaluation_tiles",
           "multi_style", "pair_decoder", "patch_decoder", "positive_pairs", "styled", "views_per_sample"]
