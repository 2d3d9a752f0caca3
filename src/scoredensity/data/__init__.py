"""Data for training and evaluation: synthetic sets with exact densities, 2-D toys, digits, MNIST, CIFAR-10,
arrays and image folders, behind one :func:`load_dataset` that returns a seeded, checked :class:`Dataset`.

Modules: :mod:`.dataset` (the Dataset, dequantisation, logit transform, bits/dim, splits, batches),
:mod:`.toys` (mixture samples and 2-D toys), :mod:`.files` (readers for files on disk), :mod:`.load`.
"""

from .dataset import (
    LOGIT_ALPHA,
    DataError,
    Dataset,
    array_sha256,
    batch_indices,
    iterate_batches,
    make_dataset,
    split_indices,
)
from .load import DEFAULT_N, dataset_names, infer_levels, load_dataset
from .toys import TOY_SCALING, TOYS, sample_mixture, sample_toy

__all__ = [
    "Dataset",
    "DataError",
    "LOGIT_ALPHA",
    "load_dataset",
    "make_dataset",
    "dataset_names",
    "infer_levels",
    "split_indices",
    "batch_indices",
    "iterate_batches",
    "array_sha256",
    "DEFAULT_N",
    "TOYS",
    "TOY_SCALING",
    "sample_toy",
    "sample_mixture",
]
