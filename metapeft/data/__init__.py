"""Long-tailed datasets for MetaPEFT: the authors' index-file layout with class-split yaml files, ImageFolder trees,
CIFAR-100-LT from a local copy, the paper's transforms, and the demo's bundled digits tasks."""

from metapeft.data.cifar import CIFAR100LT, long_tail_counts, long_tail_indices
from metapeft.data.digits import DigitsTasks, TensorImageDataset, digits_tasks
from metapeft.data.folder import image_folder
from metapeft.data.from_config import KINDS, DataBundle, build_datasets
from metapeft.data.images import ImageDecodeError, load_image
from metapeft.data.index import DataFormatError, IndexDataset, read_index
from metapeft.data.seeded import SeededSamples, item_digest, sample_seed, seeded_generators
from metapeft.data.splits import (
    BUILTIN_SPLITS,
    ClassSplit,
    builtin_split,
    class_split,
    find_classnames,
    read_class_split,
    read_classnames,
)
from metapeft.data.transforms import backbone_normalization, build_transforms

__all__ = [
    "BUILTIN_SPLITS",
    "CIFAR100LT",
    "KINDS",
    "ClassSplit",
    "DataBundle",
    "DataFormatError",
    "DigitsTasks",
    "ImageDecodeError",
    "IndexDataset",
    "SeededSamples",
    "TensorImageDataset",
    "backbone_normalization",
    "build_datasets",
    "build_transforms",
    "builtin_split",
    "class_split",
    "digits_tasks",
    "find_classnames",
    "image_folder",
    "item_digest",
    "load_image",
    "long_tail_counts",
    "long_tail_indices",
    "read_class_split",
    "read_classnames",
    "read_index",
    "sample_seed",
    "seeded_generators",
]
