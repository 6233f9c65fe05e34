"""Train / val / test splits by group, so that test structures are unlike the training ones.

A split is a dict ``{"train": [groups], "val": [groups], "test": [groups]}`` (a ``splits.json`` on disk);
a group (defect type, material) is never in two splits. ``random_group_split`` makes a deterministic
one for user data: the same groups, seed and fractions always give the same split, whatever the order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from relaxtune.atomic import atomic_write_text
from relaxtune.data.pairs import DataError, RelaxationPair, read_splits_file

SPLIT_NAMES = ("train", "val", "test")


def load_splits(path: str | Path) -> dict[str, list[str]]:
    """Read a ``splits.json`` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "splits.json"
    if not path.exists():
        raise DataError(f"{path}: splits: file not found")
    return read_splits_file(path)


def write_splits(path: str | Path, split: Mapping[str, Sequence[str]]) -> Path:
    """Write a split as JSON (atomically); a directory gets ``splits.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "splits.json"
    return atomic_write_text(json.dumps({k: list(v) for k, v in split.items()}, indent=1) + "\n", path)


def has_splits(pairs: Sequence[RelaxationPair]) -> bool:
    """True when the pairs carry split tags (their dataset has a ``splits.json``)."""
    return any(p.split for p in pairs)


def pairs_in_split(pairs: Sequence[RelaxationPair], split: str) -> list[RelaxationPair]:
    """The pairs tagged ``split``; a DataError when the pairs carry no split tags at all."""
    if not has_splits(pairs):
        raise DataError(f"split {split!r}: the data have no splits (no splits.json)")
    return [p for p in pairs if p.split == split]


def train_and_val(pairs: Sequence[RelaxationPair]) -> tuple[list[RelaxationPair], list[RelaxationPair]]:
    """What fine-tuning on one dataset trains and validates on: its ``train`` and ``val`` splits when it has
    splits, else every pair for training and none for validation."""
    if has_splits(pairs):
        return pairs_in_split(pairs, "train"), pairs_in_split(pairs, "val")
    return list(pairs), []


def split_pairs(pairs: Sequence[RelaxationPair], split: Mapping[str, Sequence[str]] | str | Path | None = None
                ) -> dict[str, list[RelaxationPair]]:
    """Pairs by split: ``{"train": [...], "val": [...], "test": [...]}`` (always those three keys).

    ``split`` is a dict of groups per split, a path to a ``splits.json``, or None to use the split each pair
    got from its dataset's ``splits.json`` (pairs without one go to train). Groups named in no split go to
    an extra ``"unassigned"`` key, so nothing is silently trained on.
    """
    if isinstance(split, (str, Path)):
        split = load_splits(split)
    out: dict[str, list[RelaxationPair]] = {name: [] for name in SPLIT_NAMES}
    if split is None:
        for p in pairs:
            out.setdefault(p.split or "train", []).append(p)
        return out
    where: dict[str, str] = {}
    for name, groups in split.items():
        out.setdefault(name, [])
        for g in groups:
            if g in where and where[g] != name:
                raise DataError(f"split: group {g!r} is in both {where[g]!r} and {name!r}")
            where[g] = name
    for p in pairs:
        out.setdefault(where.get(p.group, "unassigned"), []).append(p)
    return out


def groups_of(pairs_or_groups: Iterable[RelaxationPair | str]) -> list[str]:
    """Sorted unique group names."""
    return sorted({x if isinstance(x, str) else x.group for x in pairs_or_groups})


def random_group_split(pairs_or_groups: Iterable[RelaxationPair | str],
                       fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                       names: Sequence[str] = SPLIT_NAMES) -> dict[str, list[str]]:
    """A deterministic random split of whole groups, ``fractions`` of the groups per split.

    Groups are sorted before shuffling with ``numpy.random.default_rng(seed)``, so the result depends only
    on the set of groups, the seed and the fractions. Every split with a non-zero fraction gets at least one
    group when there are enough groups. Note that it splits groups, not structures: give related structures
    (rattles of one defect, strains of one material) the same ``group``.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise DataError(f"split: fractions: need {len(names)} non-negative numbers, got {fractions}")
    total = sum(fractions)
    fractions = [f / total for f in fractions]
    groups = groups_of(pairs_or_groups)
    n = len(groups)
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(n)]
    counts = [int(np.floor(f * n)) for f in fractions]
    # hand out the remainder by largest fractional part (ties: split order), then make sure every wanted
    # split gets one group when possible, taking from the largest
    for i in sorted(range(len(names)), key=lambda i: (-(fractions[i] * n - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0 and n >= sum(1 for x in fractions if x > 0):
            donor = max(range(len(names)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    out, start = {}, 0
    for name, count in zip(names, counts):
        out[name] = sorted(order[start:start + count])
        start += count
    return out
