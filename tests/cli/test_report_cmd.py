"""`relaxtune report RUN_DIR`: a report from a real tiny run through the real entry point; bad RUN_DIR is one
line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ase.io import write

from relaxtune.data import dataset_of, load_pairs
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import finetune
from helpers import run_cli as run

ROOT = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """1 epoch of Stillinger-Weber BPTT (k = 3) on a real GPAW vacancy; validation and test: real QE Si2."""
    tmp = tmp_path_factory.mktemp("cli_report")
    data = tmp / "data"
    data.mkdir()
    shutil.copy(ROOT / "src/relaxtune/data/builtin/si-defects/vacancy_1.extxyz", data)
    si2 = load_pairs(ROOT / "tests/data/files/si2_relax.pwo.gz")[0]
    frames = list(si2.trajectory)
    frames[0].info.update(name="si2_relax", group="si2")
    write(data / "si2_relax.extxyz", frames, format="extxyz")
    (data / "splits.json").write_text(json.dumps({"train": ["vacancy"], "test": ["si2"]}))
    pairs = load_pairs(data)
    config = TrainConfig(model="sw", grad="full", steps=3, epochs=1, batch_size=1, lr=1e-3, dtype="float64",
                         eval_max_steps=300, distill_weight=0.0, retention_check=False)
    summary = finetune(config, [p for p in pairs if p.split == "train"], [p for p in pairs if p.split == "test"],
                       tmp / "run", progress=False, data=dataset_of(f"{data}:train"))
    return tmp / "run", data, summary


def test_report_command_writes_report(monkeypatch, capsys, tiny_run, tmp_path):
    run_dir, data, summary = tiny_run
    out = tmp_path / "rep"
    code, stdout, _ = run(monkeypatch, capsys, "report", run_dir, "--out", out, "--data", data, "--split", "test")
    assert code == 0, stdout
    assert f"wrote {out / 'report.md'}" in stdout and "(6 plots)" in stdout
    md = (out / "report.md").read_text()
    for png in ("curves.png", "dq_scatter.png", "dq_bars.png", "displacements.png", "energy_traces.png",
                "movement.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 6
    assert f"{summary['n_train']} |" in md and "si2_relax" in md


def test_report_compares_on_the_test_split_of_the_data_the_run_trained_on(monkeypatch, capsys, tiny_run, tmp_path):
    """The run records its data (summary.json "data"), so a plain ``relaxtune report RUN`` compares on that data's
    test split, not on a shipped dataset that happens to hold a structure of the same name (vacancy_1)."""
    run_dir, data, summary = tiny_run
    assert summary["data"] == str(data.resolve())
    out = tmp_path / "rep"
    code, stdout, _ = run(monkeypatch, capsys, "report", run_dir, "--out", out, "--traces", "1")
    assert code == 0, stdout
    md = (out / "report.md").read_text()
    assert f"`{data.resolve()}`, split `test`: 1 structures" in md and "si2_relax" in md


def test_report_default_out_is_inside_the_run(monkeypatch, capsys, tiny_run):
    run_dir, data, _ = tiny_run
    code, stdout, _ = run(monkeypatch, capsys, "report", run_dir, "--data", data, "--traces", "1")
    assert code == 0 and (run_dir / "report" / "report.html").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_bad_run_dir_is_one_line_exit_2(monkeypatch, capsys, tmp_path, kind):
    target = tmp_path / "x"
    if kind == "file":
        target.write_text("hello")
    elif kind == "empty":
        target.mkdir()
    code, stdout, stderr = run(monkeypatch, capsys, "report", target)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]
    assert "Traceback" not in stderr
