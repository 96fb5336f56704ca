"""Data: lazy image/label IO, quantile input normalization, label -> target conversion, tile sampling,
synthetic blobs and the embedded real sample data.

Contracts other modules rely on:

* :func:`open_image` -> :class:`Image` with ``shape == (C, *spatial)``; ``image[region]`` reads only that
  region (a new ndarray). :func:`open_labels` -> the same without the channel axis.
* :func:`fit_normalization` ``(settings, image)`` with an :class:`InputNormalization` (a pydantic config,
  defined in :mod:`tilenorm_bmz.config`) -> :class:`FittedNormalization` whose ``apply(x (C, *spatial))``
  returns float32.
* :class:`TileSampler` yields :class:`Tile` objects: ``image`` ``(C, *tile)`` float32 normalized and
  ``target`` ``(K, *tile)`` (foreground, boundary[, background]); its ``state_dict()`` resumes exactly.
* :func:`create_output` / :class:`OutputArray` (Zarr, atomic finalize, chunk-aligned concurrent writes)
  and :func:`write_tiff` (atomic) for predictions.
"""

from ..config import DataConfig, InputNormalization
from .dataset import DataPair, TrainingData, ValidationItem, build_training_data, open_pairs
from .independent import IndependentImage, IndependentImages, load_independent
from .io import (
    IMAGE_SUFFIXES,
    Image,
    ImageFormatError,
    OutputArray,
    as_image,
    create_output,
    open_image,
    open_labels,
    write_tiff,
)
from .labels import clean_labels, fill_label_holes, instances_to_targets, target_channel_names
from .normalize import FittedNormalization, channel_quantiles, dataset_quantiles, fit_normalization, normalize
from .sampler import Region, SamplerSource, Tile, TileSampler, split_by_image, split_by_region
from .samples import SAMPLE_DIR, SampleInfo, list_samples, load_sample, sample_info, sample_path
from .synthetic import synthetic_blobs

__all__ = [
    "IMAGE_SUFFIXES",
    "SAMPLE_DIR",
    "DataConfig",
    "DataPair",
    "FittedNormalization",
    "Image",
    "IndependentImage",
    "IndependentImages",
    "ImageFormatError",
    "InputNormalization",
    "OutputArray",
    "Region",
    "SampleInfo",
    "SamplerSource",
    "Tile",
    "TileSampler",
    "TrainingData",
    "ValidationItem",
    "as_image",
    "build_training_data",
    "channel_quantiles",
    "clean_labels",
    "create_output",
    "fill_label_holes",
    "dataset_quantiles",
    "fit_normalization",
    "instances_to_targets",
    "list_samples",
    "load_independent",
    "load_sample",
    "normalize",
    "open_image",
    "open_labels",
    "open_pairs",
    "sample_info",
    "sample_path",
    "split_by_image",
    "split_by_region",
    "synthetic_blobs",
    "target_channel_names",
    "write_tiff",
]
