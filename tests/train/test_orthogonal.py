"""Updates that keep the bulk's energies and stresses to first order."""

import numpy as np
import torch
from ase.build import bulk

from relaxtune.potentials.classical import StillingerWeber
from relaxtune.train.distill import perturbed_copies
from relaxtune.train.orthogonal import OrthogonalUpdates, bulk_outputs


def _setup():
    model = StillingerWeber().to(torch.float64)
    params = list(model.parameters())
    diamond = bulk("Si", "diamond", a=5.43)
    diamond.info = {"name": "Si"}
    structures = perturbed_copies([diamond], 1, seed=0, max_shear=0.0, rattle=0.0)  # cubic: energy and pressure
    return model, params, structures, OrthogonalUpdates(model, structures, params, torch.float64)


def _outputs(model, structures) -> np.ndarray:
    return torch.stack([o.detach() for o in bulk_outputs(model, structures, torch.float64)]).numpy()


def _move(params, before, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b + scale * b.abs().clamp_min(1.0) * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_the_basis_spans_the_outputs_that_move_and_nothing_they_share():
    _, params, _, ortho = _setup()
    k = ortho.basis.shape[1]
    # energy and pressure of a cubic cell: two directions of the six weights (shear stresses are 0 by symmetry,
    # the three normal stresses equal)
    assert k == 2 < len(params)
    assert torch.allclose(ortho.basis.T @ ortho.basis, torch.eye(k, dtype=torch.float64), atol=1e-10)


def test_a_projected_step_keeps_energy_and_stress_to_first_order_and_takes_the_rest():
    model, params, structures, ortho = _setup()
    before = [p.detach().clone() for p in params]
    reference = _outputs(model, structures)
    _move(params, before, 1e-5)
    start = torch.cat([b.reshape(-1) for b in before])
    raw_step = ortho.weights() - start
    raw = np.abs(_outputs(model, structures) - reference).max()
    ortho.project(start)
    step = ortho.weights() - start
    kept = np.abs(_outputs(model, structures) - reference).max()
    assert kept < 1e-3 * raw
    assert float(step.norm()) > 0.1 * float(raw_step.norm())  # most of the step is still taken
    assert float((ortho.basis.T @ step).abs().max()) < 1e-12 * float(step.norm())


def test_a_chgnet_run_moves_its_weights_only_orthogonally_to_the_bulk_outputs(tmp_path):
    # the real trainer with its defaults: every step is projected, so the whole move lies outside the span
    from relaxtune.data import load_pairs
    from relaxtune.potentials.chgnet import CHGNetModel
    from relaxtune.train.config import TrainConfig
    from relaxtune.train.distill import distillation_set
    from relaxtune.train.finetune import finetune

    pairs = [p for p in load_pairs("builtin:si-defects") if p.name in ("vacancy_1", "sub_B_1")]
    config = TrainConfig(model="chgnet", objective="structure", grad="implicit", optimizer="fire", epochs=1,
                         batch_size=1, lr=1e-4, steps=60, warmup_frac=0.0, schedule="constant", retention_check=False)
    assert config.distill_orthogonal
    finetune(config, pairs, [], tmp_path, progress=False)
    base = CHGNetModel()
    named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
    trained = torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"]
    move = torch.cat([(trained[n] - p.detach()).reshape(-1) for n, p in named])
    structures = distillation_set(base, ["B", "Si"], config.distill_per_prototype, config.seed, torch.float32)
    basis = OrthogonalUpdates(base, structures, [p for _, p in named], torch.float32).basis
    assert float(move.norm()) > 0
    # without the projection the same run leaves 0.18 of its move in the span; with it, float32 round-off
    assert float((basis.T @ move).norm()) < 1e-3 * float(move.norm())


def test_training_on_cell_relaxations_trains_without_the_projection_and_says_so(tmp_path):
    from swdata import SW_TRAINING, make_cell_relaxation

    from relaxtune.train.config import TrainConfig
    from relaxtune.train.finetune import Trainer

    cell_pair, _ = make_cell_relaxation()
    notes: list[str] = []
    config = TrainConfig(**{**SW_TRAINING, "start": "relaxed"})
    trainer = Trainer(config, [cell_pair], [], tmp_path / "cells", progress=False, log=notes.append)
    assert config.distill_orthogonal and trainer.keep.orthogonal is None
    assert any("hold cell relaxations" in n for n in notes)
