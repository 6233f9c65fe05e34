"""The entry point: usage errors and user errors are one line on stderr with exit code 2, never a traceback."""

import os
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

    from relaxtune.cli import use_threads

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

    import relaxtune.relax

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    write(tmp_path / "in.extxyz", [bulk("Si", "diamond", a=5.43, cubic=True)])
    monkeypatch.setattr(relaxtune.relax, "relax", interrupted)
    code, _, err = run(monkeypatch, capsys, "relax", tmp_path / "in.extxyz", "-o", tmp_path / "out.extxyz",
                       "--model", "sw")
    assert code == 130, err
    assert "aborted" in err and "Traceback" not in err


def test_version_and_a_missing_checkpoint_named_as_such(monkeypatch, capsys):
    code, stdout, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and stdout.strip().startswith("relaxtune ")
    code, _, err = run(monkeypatch, capsys, "evaluate", "builtin:si-defects-mini:val", "--model", "runs/gone/best.pt")
    assert code == 2 and "runs/gone/best.pt: no such file" in err and "unknown model" not in err
