"""Datasets and input pipelines.

    source = fgjax.data.get_source("cub", "train", data_dir="/data/CUB_200_2011")
    loader = fgjax.data.make_train_loader(source, global_batch_size=16, image_size=448,
                                          resize_size=512, seed=0)
    batch = next(loader)                 # per-process numpy batch
    gbatch = fgjax.data.to_global_batch(batch, mesh)

See `sources` (dataset layouts), `synthetic` (the synthetic fine-grained dataset), `transforms`
and `pipeline` (grain, sharding, resume).
"""
from fgjax.data.images import BadImageError, load_image, open_image
from fgjax.data.pipeline import Loader, make_eval_loader, make_train_loader, to_global_batch
from fgjax.data.sources import (DatasetError, DatasetNotFoundError, FileSource, Source,
                                SubsetSource, get_source, split_train_val)
from fgjax.data.transforms import eval_transform, normalize_image

__all__ = [
    "BadImageError", "DatasetError", "DatasetNotFoundError", "FileSource", "Loader", "Source",
    "SubsetSource", "eval_transform", "get_source", "load_image", "make_eval_loader",
    "make_train_loader", "normalize_image", "open_image", "split_train_val", "to_global_batch",
]
