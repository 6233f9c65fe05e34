"""MACE adapter vs mace's own MACECalculator, on a tiny randomly initialised model saved to a file.

mace-torch is an optional extra (it pins e3nn==0.4.4, which conflicts with sevenn 0.13.0), so the tests that
need it skip when it is not installed, unless RELAXTUNE_REQUIRE_MACE=1 (CI runs them in an environment of their
own, .ci/run); the error path for a missing mace-torch is tested either way.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.stress import voigt_6_to_full_3x3_stress

from relaxtune.potentials import load_model
from relaxtune.potentials.base import UnsupportedElementError, energy_and_forces
from relaxtune.state import Batch

HAVE_MACE = importlib.util.find_spec("mace") is not None
REQUIRE_MACE = os.environ.get("RELAXTUNE_REQUIRE_MACE") == "1"  # then a missing mace-torch fails, not skips
needs_mace = pytest.mark.skipif(not HAVE_MACE and not REQUIRE_MACE, reason="mace-torch not installed (optional extra)")


@pytest.fixture(scope="module")
def mace_file(tmp_path_factory):
    from mace import modules  # before e3nn: mace 0.3.16 makes e3nn 0.4.4's constants load under torch >= 2.6
    from e3nn import o3

    torch.manual_seed(3)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    with_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # MACE models are built and saved in float64 like mace_run_train
    try:
        model = modules.ScaleShiftMACE(
            r_max=4.5, num_bessel=6, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
            interaction_cls_first=block, num_interactions=2, num_elements=3,
            hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=np.array([-5.4, -3.1, -4.7]), avg_num_neighbors=12.0, atomic_numbers=[14, 31, 33],
            correlation=2, gate=torch.nn.functional.silu, atomic_inter_scale=1.3, atomic_inter_shift=0.05,
        )
    finally:
        torch.set_default_dtype(with_dtype)
    path = tmp_path_factory.mktemp("mace") / "tiny.model"
    torch.save(model, path)
    return path


def _structures():
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.05, seed=1)
    gaas = bulk("GaAs", "zincblende", a=5.65)
    gaas.rattle(0.05, seed=2)
    gaas.set_cell(gaas.cell.array @ np.array([[1.02, 0.01, 0.0], [0.01, 0.99, 0.0], [0.0, 0.0, 1.01]]),
                  scale_atoms=True)
    return [si, gaas]


def test_missing_mace_gives_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_mace(name, *args, **kwargs):
        if name == "mace" or name.startswith("mace."):
            raise ImportError("No module named 'mace'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mace)
    path = tmp_path / "x.model"
    path.write_bytes(b"not a model")
    with pytest.raises(ImportError, match="mace-torch"):
        load_model(str(path))


@needs_mace
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_mace_calculator(mace_file, dtype):
    from mace.calculators import MACECalculator

    model = load_model(str(mace_file), dtype=dtype)
    assert type(model).__name__ == "MACEModel"
    calc = MACECalculator(model_paths=str(mace_file), device="cpu",
                          default_dtype="float32" if dtype == torch.float32 else "float64")
    structures = _structures()
    batch = Batch.from_atoms(structures, dtype=dtype)
    out = energy_and_forces(model, batch, model.prepare(batch), compute_stress=True)
    tol_f = 1e-4 if dtype == torch.float32 else 1e-9
    for k, (atoms, sl) in enumerate(zip(structures, batch.system_slices())):
        atoms = atoms.copy()
        atoms.calc = calc
        assert out.energy[k].item() == pytest.approx(atoms.get_potential_energy(), abs=tol_f * len(atoms))
        np.testing.assert_allclose(out.forces[sl].double().numpy(), atoms.get_forces(), atol=tol_f)
        np.testing.assert_allclose(out.stress[k].double().numpy(), voigt_6_to_full_3x3_stress(atoms.get_stress()),
                                   atol=tol_f)


@needs_mace
def test_second_derivatives_and_moving_forces(mace_file):
    model = load_model(str(mace_file), dtype=torch.float64)
    batch = Batch.from_atoms(_structures(), dtype=torch.float64)
    prepared = model.prepare(batch)
    out = energy_and_forces(model, batch, prepared, create_graph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.forces**2).sum(), params, allow_unused=True)
    total = sum(g.abs().sum() for g in grads if g is not None)
    assert torch.isfinite(total) and total > 0
    moved = batch.replace(positions=batch.positions + 0.03 * torch.randn_like(batch.positions))
    out2 = energy_and_forces(model, moved, prepared)
    assert (out2.forces - out.forces.detach()).abs().max() > 1e-3


@needs_mace
def test_unsupported_element(mace_file):
    model = load_model(str(mace_file))
    batch = Batch.from_atoms([bulk("Cu", "fcc", a=3.6)])
    with pytest.raises(UnsupportedElementError, match="Cu"):
        model.prepare(batch)


@needs_mace
def test_mace_file_with_pt_suffix_is_recognised(mace_file, tmp_path):
    import shutil

    path = tmp_path / "tiny_mace.pt"
    shutil.copy(mace_file, path)
    assert type(load_model(str(path))).__name__ == "MACEModel"


@needs_mace
def test_declared_module_roles_name_modules_of_the_network(mace_file):
    model = load_model(str(mace_file))
    modules = {c for n, _ in model.named_modules() for c in n.split(".")}
    for role in ("readout_modules", "embedding_modules", "element_embedding_modules"):
        declared = getattr(model, role)
        assert declared and set(declared) <= modules, role


@needs_mace
def test_finetune_moves_a_mace_model_and_its_checkpoint_loads_as_mace(mace_file, tmp_path):
    import csv

    from swdata import make_sw_pairs

    from relaxtune.train.config import TrainConfig
    from relaxtune.train.finetune import finetune

    pairs = make_sw_pairs(3, with_trajectory=True)
    cfg = TrainConfig(model=str(mace_file), dtype="float64", objective="structure+forces", epochs=2, batch_size=2,
                      steps=60, lr=1e-3, warmup_frac=0.0, schedule="constant", distill_weight=0.0,
                      retention_check=False)
    summary = finetune(cfg, pairs[:2], pairs[2:], tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows[1:])
    assert summary["parameter_movement"]["model"]["relative"] > 0
    base = load_model(str(mace_file), dtype=torch.float64)
    tuned = load_model(str(tmp_path / "last.pt"), dtype=torch.float64)
    assert type(tuned).__name__ == "MACEModel"
    batch = Batch.from_atoms([pairs[0].final], dtype=torch.float64)
    e_base = energy_and_forces(base, batch, base.prepare(batch)).energy
    e_tuned = energy_and_forces(tuned, batch, tuned.prepare(batch)).energy
    assert abs(float(e_tuned - e_base)) > 1e-6
