"""Helpers shared by the tests (importable as ``helpers``: pyproject puts tests/ on the path)."""

from __future__ import annotations

import sys


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the real ``relaxtune`` entry point in-process; return (exit code, stdout, stderr)."""
    from relaxtune.cli import main

    monkeypatch.setattr(sys, "argv", ["relaxtune", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
