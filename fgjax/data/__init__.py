"""Datasets and input pipelines.

    source = fgjax.data.get_source("cub", "train", data_dir="/data/CUB_200_2011")
    train, val = fgjax.data.split_train_val(source, val_fraction=0.1, seed=0)
    loader = fgjax.data.make_train_loader(train, global_batch_size=16, image_size=448,
                                          resize_size=512, seed=0)
    batch = next(loader)                       # this process's numpy batch (uint8 images)
    gbatch = fgjax.data.to_global_batch(batch, mesh)   # global jax.Arrays
    # inside the jitted step: float32 images, normalised as loader.normalize says
    gbatch = fgjax.data.normalize_batch(gbatch, loader.normalize)
    state = loader.get_state()                 # JSON-serialisable; loader.set_state(state)

Modules: `sources` (`get_source`: dataset name -> source), `base` (`Source`, errors, subsets,
train/val hold-out), `layouts` (the dataset layouts on disk), `tfds_source` (tensorflow-datasets),
`images` (decoding to RGB uint8, OpenCV or PIL, draft decoding), `synthetic` (the synthetic
fine-grained birds), `transforms` (crops, flips, sharpness, colour jitter, RandAugment /
AutoAugment on OpenCV or PIL, boxes; normalisation on the device) and `pipeline` (grain loaders,
sharding, resume).
docs/datasets.md describes the folder layouts and options.
"""
from fgjax.data.base import (DatasetError, DatasetNotFoundError, Source, SubsetSource,
                             split_train_val)
from fgjax.data.images import BadImageError, load_image, open_image, read_image
from fgjax.data.layouts import FileSource
from fgjax.data.pipeline import (EvalLoader, Loader, batch_spec, make_eval_loader,
                                 make_train_loader, to_global_batch)
from fgjax.data.sources import DATASETS, get_source
from fgjax.data.synthetic import SyntheticSource
from fgjax.data.tfds_source import TfdsSource
from fgjax.data.transforms import (Normalizer, eval_transform, normalize_batch,
                                   normalize_image, normalize_images, train_transform)

__all__ = [
    "BadImageError", "DATASETS", "batch_spec", "DatasetError", "DatasetNotFoundError", "EvalLoader",
    "FileSource", "Loader", "Normalizer", "Source", "SubsetSource", "SyntheticSource",
    "TfdsSource", "eval_transform", "get_source", "load_image", "make_eval_loader",
    "make_train_loader", "normalize_batch", "normalize_image", "normalize_images", "open_image",
    "read_image", "split_train_val", "to_global_batch", "train_transform",
]
