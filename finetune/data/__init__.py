"""Data for finetune: sources (ImageFolder, filename labels, CSV, CIFAR, the bundled sample), transforms matched
to the backbone, a decoded-image cache, bad-file handling and seeded loaders.

The public API lives here; the submodules hold the parts:

- :mod:`.sources`: layouts, ``--labels`` specs (prefix/regex/csv), the stratified split
- :mod:`.images`: listing and reading image files (any colour mode -> RGB)
- :mod:`.transforms`: ``transform_config`` / ``eval_transform`` / ``train_transform``
- :mod:`.datasets`: the datasets and the decode stage the cache memoizes
- :mod:`.loader`: ``make_loader`` with a resumable, seeded sampler
- :mod:`.cifar`: CIFAR-10/100 from torchvision's on-disk format
- :mod:`.build`: ``build_data`` / ``build_eval_dataset``
- :mod:`.diskcache`: the decoded-image cache on disk (data larger than RAM)
- :mod:`.shards`: streaming WebDataset-style tar shards

Nothing here prints: warnings go to ``logging.getLogger("finetune")``, user errors are ``DataError``.
"""

from finetune.data.build import DataBundle, build_data, build_eval_dataset, resolve_data_path
from finetune.data.datasets import ImageDataset, TensorImageDataset, decode
from finetune.data.images import IMG_EXTENSIONS, list_images, load_image, named_images
from finetune.data.loader import EpochSampler, default_workers, make_loader, set_epoch
from finetune.data.shards import check_recipe as check_stream_recipe
from finetune.data.sources import VAL_NAMES, stratified_split
from finetune.data.transforms import (AUGMENTS, eval_transform, is_deterministic, train_transform,
                                      transform_config)

__all__ = [
    "AUGMENTS", "IMG_EXTENSIONS", "VAL_NAMES", "DataBundle", "EpochSampler", "ImageDataset", "TensorImageDataset",
    "check_stream_recipe",
    "build_data", "build_eval_dataset", "decode", "default_workers", "eval_transform", "is_deterministic",
    "list_images", "load_image", "named_images", "make_loader", "resolve_data_path", "set_epoch", "stratified_split",
    "train_transform", "transform_config",
]
