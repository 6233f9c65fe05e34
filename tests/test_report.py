"""relaxtune.report: a report from a real (tiny) fine-tuning run, consistency with the trainer's own numbers,
run directories with missing pieces, the cache, and the HTML conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from ase.io import write

from relaxtune.data import load_pairs
from relaxtune.report import ReportError, _fmt, load_run, markdown_to_html, write_report
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import finetune

ROOT = Path(__file__).resolve().parents[1]
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
                         dtype="float64", eval_max_steps=300, val_start="initial", distill_weight=0.0)  # the report relaxes from initial
    summary = finetune(config, train, test, tmp / "run", progress=False)
    return tmp / "run", data, summary


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    run, data, summary = run_dir
    out = tmp_path_factory.mktemp("report_out")
    return write_report(run, out, data=str(data), split="test"), summary


def test_report_files_plots_and_numbers(report):
    result, summary = report
    md = result.markdown.read_text()
    assert result.markdown.name == "report.md" and result.html.exists()
    assert set(result.plots) == {"curves", "scatter", "bars", "displacements", "traces", "movement"}
    for name, png in result.plots.items():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, name
        assert img[..., :3].std() > 0.01, f"{name} is blank"
        assert f"]({png.name})" in md, name
    # numbers from summary.json, formatted as the report formats them
    assert _fmt(summary["val_before"]["dq_mean"]) in md
    assert _fmt(summary["val_after"]["dq_mean"]) in md
    assert f"best epoch {summary['best_epoch']}" in md
    moved = summary["parameter_movement"]["model"]
    assert _fmt(moved["relative"]) in md and _fmt(moved["absolute"]) in md
    assert "| `lr` | 0.0030 |" in md and "| `grad` | full |" in md
    assert "si2_relax" in md and "vacancy_1" in md
    assert "Missing" not in md
    # the run's retention check, item by item with its verdict
    kept = summary["retention"]
    assert "## Retention" in md and f"{kept['counts']['worse']} worse" in md
    assert all(item["item"] in md for item in kept["items"])


def test_report_html_is_self_contained(report):
    result, _ = report
    page = result.html.read_text()
    assert page.count("data:image/png;base64,") == len(result.plots)
    assert 'src="curves.png"' not in page
    assert "<table>" in page and "<h2>Settings</h2>" in page


def test_report_relaxations_match_the_trainers_validation(report):
    """The held-out pair is also the validation pair, relaxed with the same settings: the report's
    pretrained and best.pt Dq must equal the trainer's epoch-0 and best-epoch validation Dq."""
    result, summary = report
    cmp = result.comparison
    assert [r["name"] for r in cmp["before"]] == ["si2_relax"]
    assert cmp["before"][0]["dq"] == pytest.approx(summary["val_before"]["dq_mean"], rel=1e-6)
    assert cmp["after"][0]["dq"] == pytest.approx(summary["val_after"]["dq_mean"], rel=1e-6)
    row = cmp["before"][0]
    assert len(row["displacements"]) == 2 and max(row["displacements"]) == pytest.approx(row["max_disp"])
    trace = row["energy_trace"]
    assert len(trace) == row["steps"] + 1 and trace[-1] < trace[0]  # a relaxation lowers the energy


def test_report_reuses_cached_relaxations(run_dir, report, monkeypatch):
    result, _ = report
    import relaxtune.report as rep

    def boom(*a, **k):
        raise AssertionError("relaxed again although the cache matches")

    monkeypatch.setattr(rep, "relax_pairs", boom)
    run, data, _ = run_dir
    again = write_report(run, result.markdown.parent, data=str(data), split="test")
    assert again.comparison["before"] == result.comparison["before"]
    # a different setting is a different key: relaxes again (here: fails, which the report states)
    other = write_report(run, result.markdown.parent, data=str(data), split="test", fmax=0.01)
    assert other.comparison is None
    assert "relaxing" in other.markdown.read_text() and "AssertionError: relaxed again" in other.markdown.read_text()


def test_missing_pieces_are_reported_not_fatal(run_dir, tmp_path):
    run, data, _ = run_dir
    only_metrics = tmp_path / "only_metrics"
    only_metrics.mkdir()
    shutil.copy(run / "metrics.csv", only_metrics)
    res = write_report(only_metrics, data=str(data))
    md = res.markdown.read_text()
    assert "summary.json is missing" in md and "neither best.pt nor last.pt exists" in md
    assert "base model is unknown" in md and set(res.plots) == {"curves"}

    no_summary = tmp_path / "killed"
    no_summary.mkdir()
    shutil.copy(run / "last.pt", no_summary)
    res = write_report(no_summary, tmp_path / "out2")  # no --data, no summary: nothing to compare on
    md = res.markdown.read_text()
    assert "fine-tuned model compared: `last.pt`" in md and "pass `--data DATA`" in md
    assert "Not available: summary.json has no `parameter_movement`" in md
    assert "| `model` | sw |" in md  # settings from the checkpoint

    empty_split = write_report(run, tmp_path / "out3", data=str(data), split="val")
    assert "has no structures in split `val`" in empty_split.markdown.read_text()


def test_bad_run_dirs(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        load_run(tmp_path / "f.txt")
    with pytest.raises(ReportError, match="holds none of"):
        load_run(tmp_path)
    (tmp_path / "best.pt").write_text("not a checkpoint")
    run = load_run(tmp_path)
    assert run.model_path is None and any("unreadable" in n for n in run.notes)


def test_markdown_to_html_subset(tmp_path):
    md = "# T\n\nSome `code` and **bold** <x>.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n- two\n\n![alt](missing.png)\n"
    page = markdown_to_html(md, tmp_path)
    assert "<h1>T</h1>" in page and "<code>code</code>" in page and "<strong>bold</strong>" in page
    assert "&lt;x&gt;" in page and "<td>1</td><td>2</td>" in page and "<li>two</li>" in page
    assert 'src="missing.png"' in page  # not found: left as a reference
