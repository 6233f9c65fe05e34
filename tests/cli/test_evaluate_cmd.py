"""`relaxtune evaluate`: metrics JSON on stdout and in --json, splits, checkpoints as models, one-line errors."""

from __future__ import annotations

import json

import pytest

from swdata import TRUTH, write_sw_dataset

from helpers import run_cli as run

KEYS = {"n", "dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate", "converged_rate",
        "steps_mean"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("swdata")
    write_sw_dataset(d, n=4, splits={"train": ["g0", "g1"], "val": ["g2"], "test": ["g3"]})
    return d


def test_evaluate_prints_and_writes_metrics(monkeypatch, capsys, dataset, tmp_path):
    out = tmp_path / "m.json"
    code, stdout, err = run(monkeypatch, capsys, "evaluate", dataset, "--model", "sw", "--json", out,
                            "--no-progress")
    assert code == 0, err
    printed = json.loads(stdout)
    assert set(printed) == KEYS and printed["n"] == 4
    written = json.loads(out.read_text())
    assert KEYS <= set(written) and len(written["rows"]) == 4
    assert written["dq_mean"] == pytest.approx(printed["dq_mean"])
    assert {r["name"] for r in written["rows"]} == {"sw0", "sw1", "sw2", "sw3"}


def test_evaluate_split_and_checkpoint_model(monkeypatch, capsys, dataset, tmp_path):
    import torch

    from relaxtune.potentials.classical import StillingerWeber
    from relaxtune.train.checkpoint import FORMAT, VERSION, atomic_save

    truth = StillingerWeber(**TRUTH)
    ck = tmp_path / "truth.pt"
    atomic_save({"format": FORMAT, "version": VERSION, "model_spec": "sw", "dtype": "float64",
                 "state_dict": truth.state_dict(), "step_params": None, "config": {}}, ck)
    code, stdout, err = run(monkeypatch, capsys, "evaluate", dataset, "--model", ck, "--split", "test",
                            "--fmax", "0.0001", "--no-progress")
    assert code == 0, err
    assert "warning" not in err  # an old checkpoint without train_species: nothing to compare with
    atomic_save({"format": FORMAT, "version": VERSION, "model_spec": "sw", "dtype": "float64",
                 "state_dict": truth.state_dict(), "step_params": None, "config": {}, "train_species": ["C"]},
                tmp_path / "c.pt")
    code, _, err = run(monkeypatch, capsys, "evaluate", dataset, "--model", tmp_path / "c.pt", "--split", "test",
                       "--no-progress")
    assert code == 0 and "warning: Si not in the fine-tuning data of" in err and "(trained on C)" in err
    m = json.loads(stdout)
    assert m["n"] == 1 and m["dq_mean"] < 1e-3  # the reference potential reproduces its own relaxation
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", dataset, "--model", "sw", "--split", "test",
                          "--no-progress")
    assert json.loads(stdout)["dq_mean"] > 0.05


@pytest.mark.parametrize("args, message", [
    (["--model", "nonsense"], "--model nonsense"),
    (["--model", "sw", "--split", "holdout"], "--split holdout"),
    (["--model", "sw", "--start", "halfway"], "Invalid value for '--start': 'halfway' is not one of 'initial', 'relaxed'"),
    (["-m", "nonsense"], "--model nonsense: unknown model"),
])
def test_evaluate_user_errors(monkeypatch, capsys, dataset, args, message):
    code, _, err = run(monkeypatch, capsys, "evaluate", dataset, *args, "--no-progress")
    assert code == 2 and message in err and "Traceback" not in err


def test_evaluate_symprec_adds_dq_up_to_symmetry_and_rejects_a_bad_tolerance(monkeypatch, capsys, dataset):
    code, stdout, err = run(monkeypatch, capsys, "evaluate", dataset, "--model", "sw", "--split", "test",
                            "--symprec", "0.1", "--no-progress")
    m = json.loads(stdout)
    assert code == 0 and m["dq_sym_mean"] <= m["dq_mean"] + 1e-9 and "operations: Dq" in err
    code, _, err = run(monkeypatch, capsys, "evaluate", dataset, "--model", "sw", "--symprec", "-1", "--no-progress")
    assert code == 2 and "--symprec -1.0: must be a positive distance in Å" in err and "Traceback" not in err


def test_evaluate_step_size_sets_the_relaxation_step_and_is_recorded(monkeypatch, capsys, dataset, tmp_path):
    """A capped relaxation (the reference method's protocol) depends on η; --step-size sets GD's step and
    the JSON records the η used (the default when it is not given)."""
    results = {}
    for eta in (None, "0.001", "0.02"):
        out = tmp_path / f"{eta}.json"
        code, _, err = run(monkeypatch, capsys, "evaluate", dataset, "--model", "sw", "--optimizer", "gd",
                           "--max-steps", "3", "--json", out, *(["--step-size", eta] if eta else []),
                           "--no-progress")
        assert code == 0, err
        results[eta] = json.loads(out.read_text())
    assert results[None]["step_size"] == pytest.approx(0.02) and results["0.001"]["step_size"] == pytest.approx(0.001)
    assert results[None]["dq_mean"] == pytest.approx(results["0.02"]["dq_mean"])
    assert results["0.001"]["dq_mean"] != pytest.approx(results["0.02"]["dq_mean"], rel=1e-3)
    code, _, err = run(monkeypatch, capsys, "evaluate", dataset, "--model", "sw", "--step-size", "-1",
                       "--no-progress")
    assert code == 2 and "--step-size" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["--fmax", "-1"], ["--max-steps", "-5"], ["--batch-size", "0"]])
def test_out_of_range_options_are_one_line_usage_errors(monkeypatch, capsys, args):
    code, _, err = run(monkeypatch, capsys, "evaluate", "builtin:si-defects-mini:val", "--model", "sw", *args)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 6, err


def test_an_unwritable_json_path_fails_before_any_compute(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "evaluate", "builtin:si-defects-mini:val", "--model", "sw", "--json",
                       tmp_path / "missing" / "x.json")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_json_is_written_after_every_batch_and_ctrl_c_keeps_it(monkeypatch, capsys, dataset, tmp_path):
    """--json holds the finished structures as the run goes ("partial": true); Ctrl-C leaves that file, says so
    on one line and exits 130. Batch by batch, the numbers are those of one evaluate() call."""
    import relaxtune.evaluate
    from relaxtune.cli import evaluate_cmd
    from relaxtune.data import load_pairs
    from relaxtune.potentials import load_model

    import torch

    whole = relaxtune.evaluate.evaluate(load_model("sw"), load_pairs(str(dataset)), batch_size=2, max_steps=30,
                                        dtype=torch.float64)
    out = tmp_path / "m.json"
    code, _, err = run(monkeypatch, capsys, "evaluate", dataset, "-m", "sw", "--batch-size", "2", "--max-steps",
                       "30", "--json", out, "--no-progress")
    assert code == 0, err
    done = json.loads(out.read_text())
    assert done["partial"] is False and done["n"] == 4
    assert [r["dq"] for r in done["rows"]] == pytest.approx([r["dq"] for r in whole.rows], rel=1e-9)
    assert done["dq_mean"] == pytest.approx(whole.metrics["dq_mean"], rel=1e-9)

    real, seen = relaxtune.evaluate.evaluate, []

    def interrupted_at_the_second_batch(*args, **kwargs):
        seen.append(json.loads(out.read_text()) if len(seen) else None)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out.unlink()
    monkeypatch.setattr(evaluate_cmd, "evaluate", interrupted_at_the_second_batch)
    code, _, err = run(monkeypatch, capsys, "evaluate", dataset, "-m", "sw", "--batch-size", "2", "--max-steps",
                       "30", "--json", out, "--no-progress")
    assert code == 130 and err.strip().splitlines() == [f'aborted: 2 of 4 structures evaluated are in {out} '
                                                        '("partial": true)'], err
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and partial["n_total"] == 4 and partial["n"] == len(partial["rows"]) == 2
    assert partial["model"] == "sw" and partial["fmax"] == 0.02
    assert [r["name"] for r in partial["rows"]] == [r["name"] for r in whole.rows[:2]]
    assert partial["dq_mean"] == pytest.approx(sum(r["dq"] for r in whole.rows[:2]) / 2, rel=1e-9)


def test_ctrl_c_through_the_real_command_keeps_a_readable_partial_json(dataset, tmp_path):
    """SIGINT to ``python -m relaxtune evaluate`` once --json holds a finished batch: exit code 130, one line on
    stderr, and the JSON (replaced atomically, never half-written) holds that batch's structures."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # tiny gd steps never converge: every structure takes --max-steps steps (about 1.5 s for 1000)
    proc = subprocess.Popen([sys.executable, "-m", "relaxtune", "evaluate", str(dataset), "-m", "sw", "--optimizer",
                             "gd", "--step-size", "1e-5", "--max-steps", "1000", "--batch-size", "1", "--json",
                             str(out), "--no-progress", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith("aborted: ") and "of 4 structures evaluated" in lines[-1]
    assert len(lines) == 1  # the per-structure lines come with the metrics, from a finished run
    assert stdout == ""  # the metrics are printed only by a finished run
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and 1 <= partial["n"] < 4 and partial["n_total"] == 4
    assert {r["name"] for r in partial["rows"]} <= {"sw0", "sw1", "sw2", "sw3"}
    assert all(r["steps"] == 1000 for r in partial["rows"])
