"""Data sets: the five ground-truth curves, images, and a user's own files, split into
train / validation / test.
"""

from __future__ import annotations

from .dataset import (
    Dataset,
    make_ground_truth_data,
)
from .files import (
    check_array,
    load_array,
)
from .groundtruth import (
    GROUND_TRUTHS,
    AnalyticCurve,
    GroundTruth,
    fit_surrogate,
    ground_truth,
    surrogate_mse,
)
from .images import (
    IMAGE_DATASETS,
    SHAPES,
    SPRITE_FACTORS,
    ImageSource,
    Sprites,
    digits,
    image_shape,
    load_image_dataset,
    make_sprites,
    mnist1d,
    render_sprites,
    sample_sprite_factors,
    sprites,
)
from .loading import (
    load_dataset,
)

__all__ = [
    "GROUND_TRUTHS",
    "IMAGE_DATASETS",
    "SHAPES",
    "SPRITE_FACTORS",
    "AnalyticCurve",
    "Dataset",
    "GroundTruth",
    "ImageSource",
    "Sprites",
    "check_array",
    "digits",
    "fit_surrogate",
    "ground_truth",
    "image_shape",
    "load_array",
    "load_dataset",
    "load_image_dataset",
    "make_ground_truth_data",
    "make_sprites",
    "mnist1d",
    "render_sprites",
    "sample_sprite_factors",
    "sprites",
    "surrogate_mse",
]
