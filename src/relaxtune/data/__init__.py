"""Relaxation-pair datasets: readers and validation, splits by group, shipped datasets.

``load_pairs(spec)`` accepts a file, a directory, ``INITIAL:FINAL``, ``DIR:SPLIT``, ``builtin:NAME`` or
``builtin:NAME:SPLIT``; ``split_pairs(pairs, split)`` sorts pairs into train / val / test by group.
"""

from relaxtune.data.load import dataset_of, load_pairs
from relaxtune.data.pairs import DataError, DataWarning, RelaxationPair, minimum_image_displacement
from relaxtune.data.splits import (has_splits, load_splits, pairs_in_split, random_group_split, split_pairs,
                                   train_and_val, write_splits)

__all__ = [
    "DataError", "DataWarning", "RelaxationPair", "dataset_of", "load_pairs", "minimum_image_displacement",
    "has_splits", "load_splits", "pairs_in_split", "random_group_split", "split_pairs", "train_and_val",
    "write_splits",
]
