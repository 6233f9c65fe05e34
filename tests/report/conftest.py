"""A real (tiny) fine-tuning run shared by the report tests, and its report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ase.io import write

from relaxtune.data import load_pairs
from relaxtune.report import write_report
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import finetune

ROOT = Path(__file__).resolve().parents[2]
VACANCY = ROOT / "src/relaxtune/data/builtin/si-defects/vacancy_1.extxyz"  # GPAW PBE, 63-atom Si
SI2_QE = ROOT / "tests/data/files/si2_relax.pwo.gz"  # Quantum ESPRESSO PBE, Si2


def make_dataset(folder: Path) -> Path:
    """Two real DFT relaxations of pure Si (Stillinger-Weber can relax them): train = vacancy, test = si2."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(VACANCY, folder)
    si2 = load_pairs(SI2_QE)[0]
    frames = list(si2.trajectory)
    frames[0].info.update(name="si2_relax", group="si2")
    write(folder / "si2_relax.extxyz", frames, format="extxyz")
    (folder / "splits.json").write_text(json.dumps({"train": ["vacancy"], "test": ["si2"]}))
    return folder


def make_run(tmp: Path) -> tuple[Path, Path, dict]:
    """A real 2-epoch BPTT fine-tuning of Stillinger-Weber (k = 5 FIRE steps), validated on the test pair."""
    data = make_dataset(tmp / "data")
    pairs = load_pairs(data)
    train = [p for p in pairs if p.split == "train"]
    test = [p for p in pairs if p.split == "test"]
    config = TrainConfig(model="sw", grad="full", steps=5, epochs=2, batch_size=1, lr=3e-3, warmup_frac=0.0,
                         dtype="float64", eval_max_steps=300, val_start="initial", distill_weight=0.0)
    summary = finetune(config, train, test, tmp / "run", progress=False)
    return tmp / "run", data, summary


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """(run directory, dataset folder, summary) of the tiny run."""
    return make_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="session")
def report(run_dir, tmp_path_factory):
    """(ReportResult, summary): the run's report on the test split."""
    run, data, summary = run_dir
    out = tmp_path_factory.mktemp("report_out")
    return write_report(run, out, data=str(data), split="test"), summary
