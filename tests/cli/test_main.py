"""The entry point: usage errors and user errors are one line on stderr with exit code 2, never a traceback."""

import os
import re
import subprocess
import sys

import pytest

from helpers import run_cli as run


@pytest.mark.parametrize("args, message", [
    (["evaluate", "x.extxyz", "--model", "sw", "--bogus"], "No such option: --bogus"),
    (["data", "generate", "x.extxyz", "--out", "out", "--max-steps", "0"], "Invalid value for '--max-steps'"),
    (["evaluate", "missing.extxyz", "--model", "sw"], "missing.extxyz"),
])
def test_bad_command_lines_end_in_one_error_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "relaxtune", *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1


def test_warnings_are_one_line(tmp_path):
    from ase.build import bulk
    from ase.io import write

    diamond = bulk("C", "diamond", a=3.57)
    diamond.info["name"] = "C_0"
    write(tmp_path / "c.extxyz", [diamond])
    proc = subprocess.run([sys.executable, "-m", "relaxtune", "data", "generate", "c.extxyz", "--out", "out",
                           "--calculator", "espresso", "--relax-cell"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "ESPRESSO_COMMAND": "no-such-pw.x"})  # stops after the checks
    assert "warning: structure 'C_0': ecut 300 eV is below 500 eV" in proc.stderr
    assert "UserWarning" not in proc.stderr and "preflight(" not in proc.stderr
    assert proc.returncode == 2 and "no-such-pw.x not found" in proc.stderr


def test_threads_default_to_the_cores_shared_by_the_local_ranks(monkeypatch):
    import os

    import torch

    from relaxtune.cli.common import use_threads

    cores = len(os.sched_getaffinity(0))
    try:
        assert use_threads(0) == cores == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
        assert use_threads(0) == 1
        assert use_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(1)


def test_ctrl_c_ends_a_command_with_exit_code_130(monkeypatch, capsys, tmp_path):
    """An interrupted command must not look successful to ``relaxtune ... && next`` (typer turns Ctrl-C into
    an exit code that ``main`` has to pass on)."""
    from ase.build import bulk
    from ase.io import write

    from relaxtune.cli import relax_cmd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    write(tmp_path / "in.extxyz", [bulk("Si", "diamond", a=5.43, cubic=True)])
    monkeypatch.setattr(relax_cmd, "relax_stream", interrupted)
    code, _, err = run(monkeypatch, capsys, "relax", tmp_path / "in.extxyz", "-o", tmp_path / "out.extxyz",
                       "--model", "sw")
    assert code == 130, err
    assert "aborted" in err and "Traceback" not in err


def test_version_and_a_missing_checkpoint_named_as_such(monkeypatch, capsys):
    code, stdout, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and stdout.strip().startswith("relaxtune ")
    code, _, err = run(monkeypatch, capsys, "evaluate", "builtin:si-defects-mini:val", "--model", "runs/gone/best.pt")
    assert code == 2 and "runs/gone/best.pt: no such file" in err and "unknown model" not in err


#: words of ASE, torch and Python internals that a user's error line must not show
LEAKS = ("Traceback", "Usage:", "AssertionError", "StopIteration", "KeyError", "UnpicklingError", "weights_only",
         "torch.load", "Not a BundleTrajectory", "ULM", "invalid literal", "codec can't decode", "ase.io.",
         "NoneType", "Value error")


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert not any(leak in stderr for leak in LEAKS), stderr
    return lines[0]


@pytest.fixture
def workdir(tmp_path):
    """Inputs for the error checks: 2 Si structures, a run folder holding a run, a text file posing as a
    checkpoint."""
    from ase.build import bulk
    from ase.io import write

    write(tmp_path / "in.extxyz", [bulk("Si", "diamond", a=5.43, cubic=True)] * 2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"an earlier run's checkpoint")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["evaluate", "builtin:si-defects-mini:val", "-m", "sw", "--fmax", "-1"], "Invalid value for '--fmax'"),
    (["relax", "in.extxyz", "-o", "o.extxyz", "-m", "sw", "--max-steps", "-5"], "Invalid value for '--max-steps'"),
    (["relax", "in.extxyz", "-o", "o.extxyz", "-m", "sw", "--optimizer", "bfgs"],
     "'bfgs' is not one of 'fire', 'gd', 'lbfgs'"),
    (["finetune", "builtin:si-defects-mini", "--out", "x", "--grad", "magic"],
     "Invalid value for '--grad': 'magic' is not one of 'full', 'truncated', 'checkpoint', 'implicit', 'hybrid'"),
    (["finetune", "builtin:si-defects-mini", "--out", "run", "-m", "sw"],
     "--out run: already holds a run (last.pt); continue it with --resume, start it afresh with --overwrite"),
    (["relax", "in.extxyz", "-o", "o.extxyz", "-m", "runs/gone/best.pt"], "--model runs/gone/best.pt: no such file"),
    (["evaluate", "builtin:si-defects-mini:val", "-m", "text.pt"],
     "--model text.pt: not a relaxtune checkpoint (not a file that torch.save wrote, or a damaged one)"),
    (["relax", "in.extxyz", "-o", "/proc/relaxtune-test.extxyz", "-m", "sw"],
     "--output /proc/relaxtune-test.extxyz: not writable"),  # written by nobody, root included
])
def test_value_errors_through_the_real_command_are_one_line_exit_2(workdir, args, message):
    if "/proc" in " ".join(args) and not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux's")
    proc = subprocess.run([sys.executable, "-m", "relaxtune", *args], cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert message in _one_error_line(proc.stderr)
    assert (workdir / "run" / "last.pt").read_bytes() == b"an earlier run's checkpoint"


def test_unreadable_files_are_named_in_plain_words(monkeypatch, capsys, workdir):
    """Bad structure files and checkpoints: one line naming the file (and what it was given as), in words, not
    the reader's exception."""
    from ase.io import write

    (workdir / "garbage.xyz").write_text("this is not\na structure file\n")
    (workdir / "text.traj").write_text("not a trajectory\n")
    (workdir / "binary.extxyz").write_bytes(bytes(range(256)))
    (workdir / "folder.traj").mkdir()
    (workdir / "xx.extxyz").write_text('2\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
                                       "Xx 0 0 0\nSi 1 1 1\n")
    write(workdir / "empty.traj", [])
    cases = [
        (["relax", "garbage.xyz", "-o", "o.extxyz", "-m", "sw"],
         "garbage.xyz: cannot read structures: not an (ext)xyz file"),
        (["relax", "text.traj", "-o", "o.extxyz", "-m", "sw"],
         "text.traj: cannot read structures: not an ASE trajectory (.traj) file"),
        (["relax", "binary.extxyz", "-o", "o.extxyz", "-m", "sw"],
         "binary.extxyz: cannot read structures: binary content where text was expected"),
        (["relax", "folder.traj", "-o", "o.extxyz", "-m", "sw"], "folder.traj: is a folder, not a structure file"),
        (["relax", "xx.extxyz", "-o", "o.extxyz", "-m", "sw"],
         "xx.extxyz: cannot read structures: unknown element symbol 'Xx'"),
        (["relax", "empty.traj", "-o", "o.extxyz", "-m", "sw"], "empty.traj: "),
        (["relax", "in.extxyz", "-o", "o.extxyz", "-m", "text.pt"], "--model text.pt: not a relaxtune checkpoint"),
        (["relax", "in.extxyz", "-o", "o.extxyz", "-m", "run"], "--model run: is a folder (give the checkpoint in it"),
        (["evaluate", "text.traj", "-m", "sw"], "text.traj: format: cannot read as traj: not an ASE trajectory"),
        (["evaluate", "xx.extxyz", "-m", "sw"], "unknown element symbol 'Xx'"),
        (["evaluate", "--retention", "-m", "text.pt"], "--model text.pt: not a relaxtune checkpoint"),
        (["evaluate", "--retention", "-m", "gone.pt"], "--model gone.pt: no such file"),
        (["finetune", "text.traj", "--out", "new", "-m", "sw"], "TRAIN text.traj: format: cannot read as traj: not an"),
        (["finetune", "builtin:si-defects-mini", "--out", "new", "-m", "text.pt"],
         "--model text.pt: not a relaxtune checkpoint"),
    ]
    monkeypatch.chdir(workdir)
    for args, message in cases:
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        line = _one_error_line(err)  # finetune: before any work (no 'training on ...' line)
        assert message in line, (args, line)
        assert not line.endswith(": 'Xx'")
    assert not (workdir / "new").exists() and not (workdir / "o.extxyz").exists()


def _help(*command: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "relaxtune", *command, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_command_states_the_option_convention_and_lists_choices():
    from relaxtune.cli.common import CONVENTION

    helps = {name: _help(name) for name in ("relax", "evaluate", "finetune", "report")}
    for name, text in helps.items():
        assert CONVENTION in " ".join(text.split()), name
    assert "<fire|gd|lbfgs>" in helps["relax"] and "<fire|gd|lbfgs>" in helps["evaluate"]
    assert "<initial|relaxed>" in helps["evaluate"]
    for metavar in ("<auto|fire|gd|lbfgs>", "<full|truncated|checkpoint|implicit|hybrid>", "<initial|relaxed>",
                    "<structure|forces|structure+forces>", "<per-atom|total>", "<absolute|pretrained>",
                    "<checkpoint|full>", "<float32|float64>"):
        assert metavar in helps["finetune"], metavar
    # -m/--model wherever a model is taken; -o/--output is relax's output file; --out is a folder
    for name in ("relax", "evaluate", "finetune"):
        assert re.search(r"--model\s+-m\s", helps[name]), name
    assert re.search(r"--output\s+-o\s", helps["relax"]) and "--json" in helps["evaluate"]
    for name in ("finetune", "report"):
        assert re.search(r"│\s*--out\s+<path>", helps[name]), name
        assert not re.search(r"│[^│\n]*\s-o\s", helps[name]), name  # finetune's old -o works, hidden
    assert "--overwrite" in helps["finetune"] and "--no-progress" in helps["relax"]


def test_the_listed_choices_are_the_ones_the_config_takes():
    from relaxtune.cli import common as cli
    from relaxtune.train.config import TrainConfig

    for field, allowed in (("hybrid_head", cli.HYBRID_HEADS), ("dtype", cli.DTYPES), ("grad", cli.GRADS),
                           ("optimizer", cli.OPTIMIZERS), ("start", cli.STARTS)):
        for value in allowed:
            TrainConfig(**{field: value})
        with pytest.raises(ValueError):
            TrainConfig(**{field: "other"})


def test_ctrl_c_inside_a_write_takes_effect_after_it():
    import signal

    from relaxtune.cli.common import deferred_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
