"""`relaxtune finetune`: outputs, splits, one-line errors, and a real SIGKILL + --resume that ends where an
uninterrupted run ends."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch

from swdata import write_sw_dataset

from helpers import run_cli as run

from relaxtune.cli.finetune_cmd import CONFIG_FILE_ONLY, CONFIG_FIELDS, finetune_command
from relaxtune.train.config import TrainConfig

SW_ARGS = ["--model", "sw", "--optimizer", "gd", "--steps", "300", "--fmax", "0.001", "--batch-size", "2",
           "--lr", "0.003", "--objective", "structure", "--no-progress", "--distill-weight", "0", "--no-retention"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("swdata")
    write_sw_dataset(d, n=6)
    return d


def test_finetune_writes_outputs_and_uses_the_dataset_split(monkeypatch, capsys, dataset, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *SW_ARGS, "--epochs", "2",
                               "--grad", "implicit")
    assert code == 0, stderr
    for name in ("best.pt", "last.pt", "metrics.csv", "summary.json"):
        assert (out / name).exists()
    printed = json.loads(stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 4 and summary["n_val"] == 1
    assert summary["val_names"] == ["sw4"] and "sw5" not in summary["train_names"]  # test split untouched
    assert summary["data"] == str(dataset.resolve())  # the report's default data
    assert printed["val_dq_after"] < printed["val_dq_before"]
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["model_spec"] == "sw" and ck["config"]["grad"] == "implicit"
    assert (ck["config"]["energy_scale"], ck["config"]["energy_weight"]) == ("total", 0.1)  # the objective's default


def test_finetune_says_when_best_is_the_pretrained_model(monkeypatch, capsys, dataset, tmp_path):
    out = tmp_path / "run"
    args = [a if a != "0.003" else "1e-12" for a in SW_ARGS]  # a learning rate too small to change anything
    code, stdout, stderr = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *args, "--epochs", "1",
                               "--objective", "structure")
    assert code == 0, stderr
    assert json.loads(stdout)["best_epoch"] == 0
    assert "best.pt is the pretrained model" in stderr


def test_finetune_checkpoint_is_a_model_for_evaluate(monkeypatch, capsys, dataset, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *SW_ARGS, "--epochs", "1",
                       "--grad", "full", "--learn-step", "--step-size", "0.015", "--energy-scale", "total",
                       "--energy-weight", "0.5")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["step_size"] == 0.015 and summary["step_size_before"] == pytest.approx(0.015)
    assert (summary["config"]["energy_scale"], summary["config"]["energy_weight"]) == ("total", 0.5)
    from relaxtune.potentials import load_model

    model = load_model(str(out / "best.pt"))
    assert model.name == "sw"


@pytest.mark.parametrize("args, message", [
    (["no/such/dir"], "TRAIN no/such/dir"),
    (["DATASET", "--grad", "magic"], "grad"),
    (["DATASET", "--step-size", "-1"], "step_size"),
    (["DATASET", "--energy-scale", "per-molecule"], "Invalid value for '--energy-scale': 'per-molecule' is not one "
                                                    "of 'per-atom', 'total'"),
    (["DATASET", "--train-params", "nothing_matches"], "no parameter of the model matches"),
    (["DATASET", "--replay", "no/such/bulk"], "--replay no/such/bulk"),
])
def test_finetune_user_errors_are_one_line(monkeypatch, capsys, dataset, tmp_path, args, message):
    args = [str(dataset) if a == "DATASET" else a for a in args]
    code, _, err = run(monkeypatch, capsys, "finetune", *args, "--out", tmp_path / "x", *SW_ARGS, "--epochs", "1")
    assert code == 2
    assert message in err and len(err.strip().splitlines()[-1]) > 0
    assert "Traceback" not in err


def _cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "relaxtune", *map(str, args)], env


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(dataset, tmp_path):
    common = ["finetune", dataset, *SW_ARGS, "--epochs", "4", "--grad", "full", "--learn-step"]
    straight = tmp_path / "straight"
    cmd, env = _cli(*common, "--out", straight)
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    cmd, env = _cli(*common, "--out", killed)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill as soon as epoch 1 is on disk, wherever the run is then
        if (killed / "metrics.csv").exists() and len((killed / "metrics.csv").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    cmd, env = _cli(*common, "--out", killed, "--resume")
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    for name in ("last.pt", "best.pt"):
        a = torch.load(straight / name, weights_only=True)
        b = torch.load(killed / name, weights_only=True)
        assert a["epoch"] == b["epoch"]
        for k in a["state_dict"]:
            torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a["step_params"]["log_step_size"], b["step_params"]["log_step_size"],
                                   rtol=1e-12, atol=1e-14)
    ra = list(csv.DictReader(open(straight / "metrics.csv")))
    rb = list(csv.DictReader(open(killed / "metrics.csv")))
    assert [r["val_dq_mean"] for r in ra] == [r["val_dq_mean"] for r in rb] and len(ra) == 5


def test_an_existing_run_is_never_overwritten_and_bad_outputs_fail_first(monkeypatch, capsys, tmp_path):
    """A folder that holds a run needs --resume; an --out that is a file fails before any compute."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"a run's checkpoint")
    code, _, err = run(monkeypatch, capsys, "finetune", "builtin:si-defects-mini", "--out", out, *SW_ARGS)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (out / "last.pt").read_bytes() == b"a run's checkpoint"
    afile = tmp_path / "file"
    afile.write_text("x")
    code, _, err = run(monkeypatch, capsys, "finetune", "builtin:si-defects-mini", "--out", afile, *SW_ARGS)
    assert code == 2 and "is a file" in err


def test_every_run_checks_retention_and_evaluate_repeats_the_check(monkeypatch, capsys, dataset, tmp_path):
    out = tmp_path / "run"
    args = SW_ARGS[:-3]  # distillation and the retention check on, as by default
    code, stdout, stderr = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *args, "--epochs", "1")
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    kept = summary["retention"]
    assert kept["species"] == ["Si"] and kept["n_crystals"] == 18
    assert json.loads(stdout)["retention"] == {"kept": kept["kept"], **kept["counts"]}
    assert "retention against the pretrained model" in stderr and "eos Si: lattice constant" in stderr
    checked = tmp_path / "retention.json"
    code, stdout, stderr = run(monkeypatch, capsys, "evaluate", "--retention", "--model", out / "best.pt",
                               "--json", checked, "--no-progress")
    assert code == 0, stderr
    again = json.loads(checked.read_text())
    assert again["pretrained"] == "sw"
    # the same checks of the same checkpoint give the same figures (the run's also covered its validation frames)
    ran = {i["item"]: i["finetuned"] for i in kept["items"]}
    repeated = {i["item"]: i["finetuned"] for i in again["items"]}
    assert set(repeated) < set(ran) and any(name.startswith("frames validation") for name in ran)
    assert [repeated[k] for k in repeated] == pytest.approx([ran[k] for k in repeated], rel=1e-6)


def test_resume_refuses_changed_options_in_one_line_unless_forced(monkeypatch, capsys, dataset, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *SW_ARGS, "--epochs", "1")
    assert code == 0, err
    changed = [a if a != "0.003" else "0.01" for a in SW_ARGS]
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *changed, "--epochs", "2", "--resume")
    assert code == 2 and "lr 0.003 -> 0.01" in err and "--force" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *changed, "--epochs", "2",
                            "--resume", "--force")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["config"]["lr"] == 0.003  # the stored settings went on


def test_a_config_file_sets_any_field_and_the_command_line_overrides_it(monkeypatch, capsys, dataset, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("model: sw\noptimizer: gd\nsteps: 300\nfmax: 1e-3\nbatch_size: 2\nlr: 1e-9\n"
                        "objective: structure\nepochs: 1\ndistill_weight: 0\nretention_check: false\n")
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "--out", out, "--config", settings, "--lr", "0.003",
                       "--no-progress")
    assert code == 0, err
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["lr"] == 0.003 and config["fmax"] == 1e-3 and config["epochs"] == 1  # YAML's 1e-3 is a number
    assert config["model"] == "sw" and config["dtype"] == "float64"  # the classical model's dtype
    # the run folder holds the resolved settings, which reproduce the run as a config file
    again = tmp_path / "again"
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "--out", again, "--config", out / "config.yaml",
                       "--no-progress")
    assert code == 0, err
    assert json.loads((again / "summary.json").read_text())["config"] == config
    settings.write_text("model: sw\nlearning_rate: 0.1\n")
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "--out", tmp_path / "bad", "--config", settings)
    assert code == 2 and f"--config {settings}: field 'learning_rate'" in err and len(err.strip().splitlines()) == 1


def test_overwrite_starts_a_run_afresh_and_the_old_o_still_names_the_folder(monkeypatch, capsys, dataset, tmp_path):
    """A folder holding a run is refused without --resume or --overwrite; --overwrite deletes that run's files
    (only those) before training. -o, the old spelling of --out (hidden: -o/--output names files), still works."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.pt", "last.pt", "metrics.csv", "summary.json"):
        (out / name).write_text("the earlier run's")
    (out / "notes.txt").write_text("mine")
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "-o", out, *SW_ARGS, "--epochs", "1")
    assert code == 2 and "already holds a run" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "-o", out, *SW_ARGS, "--resume", "--overwrite")
    assert code == 2 and "--resume and --overwrite: give one" in err
    assert (out / "last.pt").read_text() == "the earlier run's"
    code, stdout, err = run(monkeypatch, capsys, "finetune", dataset, "-o", out, *SW_ARGS, "--epochs", "1",
                            "--steps", "20", "--overwrite")
    assert code == 0, err
    assert f"--overwrite: deleted best.pt, last.pt, metrics.csv, summary.json of the earlier run in {out}" in err
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 1
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 2  # epochs 0 and 1 of the new run only
    assert (out / "notes.txt").read_text() == "mine"
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, *SW_ARGS)
    assert code == 2 and "--out: missing" in err


def test_ctrl_c_says_where_the_run_can_be_resumed(monkeypatch, capsys, dataset, tmp_path):
    import relaxtune.train.finetune
    from relaxtune.cli import finetune_cmd

    out = tmp_path / "run"

    def interrupted_after_an_epoch(config, train, val, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "last.pt").write_bytes(b"epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_cmd, "finetune", interrupted_after_an_epoch)
    code, _, err = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *SW_ARGS)
    assert code == 130
    assert err.strip().splitlines()[-1] == f"aborted: {out}/last.pt holds the last finished epoch; --resume continues the run"


def test_every_setting_is_an_option_with_the_librarys_default_or_named_as_config_file_only():
    params = {name: p.default for name, p in inspect.signature(finetune_command).parameters.items()}
    options = CONFIG_FIELDS & set(params)
    assert options | CONFIG_FILE_ONLY == CONFIG_FIELDS and not options & CONFIG_FILE_ONLY
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # None: resolved by the config
    for name in options - {"dtype"}:  # dtype: None on the command line, then the model's (float64 for sw/lj)
        assert params[name].default == defaults[name], name


def test_choices_in_help_are_the_ones_the_config_accepts():
    hints = typing.get_type_hints(finetune_command)
    for name in ("objective", "grad", "start", "val_start", "optimizer", "hybrid_head", "dq_scale", "energy_scale",
                 "dtype"):
        hint = hints[name]
        if typing.get_origin(hint) is typing.Union:  # Optional[Literal[...]]
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        choices = typing.get_args(hint)
        assert choices, name
        for value in choices:
            TrainConfig(**{name: value})  # every listed choice is accepted
        with pytest.raises(ValueError):
            TrainConfig(**{name: "no-such-choice"})


def test_a_config_file_only_setting_is_read_from_the_config_file(monkeypatch, capsys, dataset, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("eval_max_steps: 7\nschedule: constant\n")
    out = tmp_path / "run"
    code, _, stderr = run(monkeypatch, capsys, "finetune", dataset, "--out", out, *SW_ARGS, "--epochs", "1",
                          "--config", config)
    assert code == 0, stderr
    import yaml

    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["eval_max_steps"] == 7 and written["schedule"] == "constant"
