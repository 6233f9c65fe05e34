"""Group-wise splits: explicit, from splits.json, and the deterministic random helper."""

from __future__ import annotations

import json

import pytest
from ase.build import bulk

from relaxtune.data import (DataError, RelaxationPair, has_splits, load_splits, pairs_in_split, random_group_split,
                            split_pairs, train_and_val, write_splits)


def _pairs(groups):
    atoms = bulk("Si", "diamond", a=5.43)
    return [RelaxationPair(name=f"{g}_{i}", group=g, initial=atoms, final=atoms) for i, g in enumerate(groups)]


def test_split_by_dict_keeps_groups_together():
    pairs = _pairs(["a", "a", "b", "c", "d"])
    out = split_pairs(pairs, {"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    assert [p.name for p in out["train"]] == ["a_0", "a_1", "b_2"]
    assert [p.name for p in out["val"]] == ["c_3"] and [p.name for p in out["test"]] == ["d_4"]


def test_unlisted_groups_are_not_silently_trained_on():
    out = split_pairs(_pairs(["a", "zzz"]), {"train": ["a"], "test": []})
    assert [p.group for p in out["unassigned"]] == ["zzz"]
    assert set(out) >= {"train", "val", "test"}


def test_group_in_two_splits_is_an_error():
    with pytest.raises(DataError, match="group 'a' is in both 'train' and 'test'"):
        split_pairs(_pairs(["a"]), {"train": ["a"], "test": ["a"]})


def test_none_uses_the_split_recorded_on_each_pair():
    pairs = _pairs(["a", "b", "c"])
    pairs[1].split = "test"
    out = split_pairs(pairs, None)
    assert [p.name for p in out["train"]] == ["a_0", "c_2"] and [p.name for p in out["test"]] == ["b_1"]


def test_train_and_val_follow_the_split_tags_or_take_everything_for_training():
    untagged = _pairs(["a", "b", "c"])
    assert not has_splits(untagged)
    train, val = train_and_val(untagged)
    assert [p.name for p in train] == ["a_0", "b_1", "c_2"] and val == []
    with pytest.raises(DataError, match="no splits"):
        pairs_in_split(untagged, "test")
    tagged = _pairs(["a", "b", "c", "d"])
    for p, split in zip(tagged, ["train", "val", "test", "train"]):
        p.split = split
    assert has_splits(tagged)
    train, val = train_and_val(tagged)
    assert [p.name for p in train] == ["a_0", "d_3"] and [p.name for p in val] == ["b_1"]
    assert [p.name for p in pairs_in_split(tagged, "test")] == ["c_2"]


def test_splits_json_round_trip_and_errors(tmp_path):
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    path = write_splits(tmp_path, split)
    assert path == tmp_path / "splits.json"
    assert load_splits(tmp_path) == split
    assert [p.name for p in split_pairs(_pairs(["a", "b", "c"]), path)["val"]] == ["b_1"]
    path.write_text(json.dumps({"train": "a"}))
    with pytest.raises(DataError, match="splits.json: splits: expected"):
        load_splits(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="splits: cannot read JSON"):
        load_splits(path)


def test_random_group_split_is_deterministic_and_order_free():
    groups = [f"g{i:02d}" for i in range(20)]
    a = random_group_split(groups, (0.7, 0.15, 0.15), seed=3)
    b = random_group_split(list(reversed(groups)), (0.7, 0.15, 0.15), seed=3)
    assert a == b
    assert [len(a[k]) for k in ("train", "val", "test")] == [14, 3, 3]
    assert sorted(a["train"] + a["val"] + a["test"]) == groups  # every group exactly once
    c = random_group_split(groups, (0.7, 0.15, 0.15), seed=4)
    assert c != a


def test_random_group_split_on_pairs_never_splits_a_group():
    pairs = _pairs(["a"] * 5 + ["b"] * 3 + ["c", "d", "e"])
    split = random_group_split(pairs, seed=0)
    assert all(len(v) >= 1 for v in split.values())  # 5 groups, three wanted splits: each gets one
    out = split_pairs(pairs, split)
    for name, members in out.items():
        for g in {p.group for p in members}:
            assert all(p.group != g for other, ms in out.items() if other != name for p in ms)


def test_random_group_split_bad_fractions():
    with pytest.raises(DataError, match="fractions"):
        random_group_split(["a", "b"], (1.0, -0.1, 0.1))
    assert random_group_split(["a", "b", "c"], (1, 0, 0)) == {"train": ["a", "b", "c"], "val": [], "test": []}
