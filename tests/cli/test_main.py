"""The entry point: usage errors and user errors are one line on stderr with exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest


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
