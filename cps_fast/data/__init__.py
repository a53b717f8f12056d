"""The data layer: dataset indexes and splits, augmentation, synthetic data, loaders.

Public entry points (see each module):

- ``build_splits(cfg) -> Splits`` (datasets.py); split lists in every format and seeded
  partitions: ``read_list``, ``write_list``, ``find_split_files``, ``make_partition`` (splits.py)
- ``build_train_streams(cfg, splits, seed, method, rank, world_size)`` and
  ``iterate_val(samples, info, cfg)`` (loader.py)
- ``check_dataset(splits, mode)`` (check.py)
- ``ensure_synthetic(root)`` (synthetic.py)

``cps_fast/data/dali.py`` (the GPU pipeline) is imported only when ``data.loader=dali``.
"""

from .datasets import DatasetInfo, Sample, Splits, build_splits, make_partition, read_list
from .io import read_image, read_label
from .loader import TrainStream, build_train_streams, iterate_val
from .synthetic import ensure_synthetic, synthetic_info
from .transforms import AugParams, train_transform, train_transform_with_params, val_transform
from .check import check_dataset

__all__ = [
    "AugParams", "DatasetInfo", "Sample", "Splits", "TrainStream", "build_splits",
    "build_train_streams", "check_dataset", "ensure_synthetic", "iterate_val",
    "make_partition", "read_image", "read_label", "read_list", "synthetic_info",
    "train_transform", "train_transform_with_params", "val_transform",
]
