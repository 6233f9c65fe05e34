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


def assert_energy_forces_gradcheck(model) -> None:
    """A float64 model's energy is differentiable in positions and cell, and its forces (create_graph) in
    positions, both checked against finite differences (torch.autograd.gradcheck) on rattled 2-atom Si."""
    import torch
    from ase.build import bulk

    from relaxtune.potentials.base import energy_and_forces
    from relaxtune.state import Batch

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=3)
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    prepared = model.prepare(batch)

    def energy(positions, cell):
        return model.energy(batch.replace(positions=positions, cell=cell), prepared)

    def forces(positions):
        return energy_and_forces(model, batch.replace(positions=positions), prepared, create_graph=True).forces

    pos = batch.positions.clone().requires_grad_(True)
    cell = batch.cell.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (pos, cell), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(forces, (pos,), eps=1e-6, atol=1e-4)
