"""``dataset_of``: the dataset a data spec selects from, as a run records it."""

from __future__ import annotations

import json

import pytest
from ase.build import bulk
from ase.io import write

from relaxtune.data import dataset_of


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "refs"
    d.mkdir()
    write(d / "a.extxyz", [bulk("Si"), bulk("Si")], format="extxyz")
    (d / "splits.json").write_text(json.dumps({"train": ["a"]}))
    return d


def test_a_folder_with_or_without_its_split_is_the_folder_as_an_absolute_path(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    assert dataset_of("refs") == dataset_of("refs/:train") == dataset_of(folder) == str(folder.resolve())
    assert dataset_of("refs/a.extxyz") == str((folder / "a.extxyz").resolve())


def test_builtin_names_lose_their_split():
    assert dataset_of("builtin:si-defects-mini:train") == dataset_of("builtin:si-defects-mini") == "builtin:si-defects-mini"
    assert dataset_of("builtin:crystals:test") == "builtin:crystals"


def test_initial_final_pairs_and_missing_paths_have_no_dataset(folder):
    assert dataset_of(f"{folder / 'a.extxyz'}:{folder / 'a.extxyz'}") is None
    assert dataset_of(folder / "missing") is None
    assert dataset_of(f"{folder / 'missing'}:train") is None
