"""Self-distillation: the pretrained model's labels on strained bulk, and the loss that keeps them."""

import csv

import numpy as np
import pytest
import torch

from relaxtune.potentials.classical import SW_SI_1985, StillingerWeber
from relaxtune.train.distill import draw, distillation_loss, distillation_set, perturbed_copies
from relaxtune.train.keep_pretrained import drop_conflict
from relaxtune.data.bulk import bulk_prototypes


def _sw(**kw) -> StillingerWeber:
    return StillingerWeber(**kw).to(torch.float64)


def test_distillation_set_spans_the_volume_range_with_the_pretrained_models_labels():
    model = _sw()
    structures = distillation_set(model, ["Si"], 4, seed=0, dtype=torch.float64)
    assert len(structures) == 3 * 4  # Si, Si8, Si16 prototypes, 4 copies each
    si = [a for a in structures if a.info["name"].startswith("Si~")]
    volumes = [a.get_volume() for a in si]
    assert max(volumes) / min(volumes) == pytest.approx(1.03 ** 3 / 0.97 ** 3, rel=0.03)
    # labels: strained cells carry stress of both signs (compressed and stretched)
    pressures = [-np.trace(a.get_stress(voigt=False)) / 3 for a in si]
    assert min(pressures) < 0 < max(pressures)
    assert distillation_set(model, ["Si"], 0, seed=0, dtype=torch.float64) == []


def test_distillation_loss_is_zero_for_the_labelling_model_and_its_gradient_is_exact():
    structures = distillation_set(_sw(), ["Si"], 2, seed=1, dtype=torch.float64)[:3]
    assert float(distillation_loss(_sw(), structures, 0.1, torch.float64).detach()) < 1e-20
    other = _sw(sigma=SW_SI_1985["sigma"] * 1.01)
    assert float(distillation_loss(other, structures, 0.1, torch.float64).detach()) > 1e-3

    def loss_of(sigma):
        other.sigma.data = sigma.detach().clone()
        with torch.no_grad():
            return float(distillation_loss(other, structures, 0.1, torch.float64))

    sigma0 = other.sigma.detach().clone()
    analytic = torch.autograd.grad(distillation_loss(other, structures, 0.1, torch.float64), other.sigma)[0]
    h = 1e-6
    numeric = (loss_of(sigma0 + h) - loss_of(sigma0 - h)) / (2 * h)
    assert float(analytic) == pytest.approx(numeric, rel=1e-5)


def test_distill_force_weight_scales_only_the_force_term():
    structures = distillation_set(_sw(), ["Si"], 2, seed=1, dtype=torch.float64)[:3]
    other = _sw(sigma=SW_SI_1985["sigma"] * 1.01)
    at = {w: float(distillation_loss(other, structures, 0.1, torch.float64, force_weight=w).detach())
          for w in (0.0, 1.0, 3.0)}
    force_term = at[1.0] - at[0.0]
    assert force_term > 1e-6 and at[0.0] > 1e-6  # both the forces and the equation of state moved
    assert at[3.0] == pytest.approx(at[0.0] + 3.0 * force_term, rel=1e-10)


def test_each_step_draws_the_same_structures_on_every_rank_and_on_resume():
    assert draw(12, 8, seed=3, step=5) == draw(12, 8, seed=3, step=5)
    assert draw(12, 8, seed=3, step=5) != draw(12, 8, seed=3, step=6)
    assert len(set(draw(12, 8, seed=0, step=0))) == 8
    assert draw(3, 8, seed=0, step=0) == [0, 1, 2]


def test_perturbed_copies_keep_atoms_and_differ_in_cell():
    copies = perturbed_copies(bulk_prototypes(["Si"]), 3, seed=0)
    assert len(copies) == 9 and len({round(a.get_volume(), 6) for a in copies}) == 9


def _train(sw_pairs, tmp_path, **changes):
    from relaxtune.train.config import TrainConfig
    from relaxtune.train.finetune import finetune

    cfg = TrainConfig(model="sw", dtype="float64", optimizer="gd", steps=300, fmax=1e-3, batch_size=2, lr=3e-3,
                      eval_fmax=1e-3, objective="structure", start="initial", val_start="initial",
                      dq_scale="absolute", epochs=6, **changes)
    return finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)


def test_distillation_and_the_anchor_keep_the_pretrained_lattice_constant(sw_pairs, tmp_path):
    # the synthetic world's "DFT" is an SW with another length scale: plain training moves the lattice constant
    lattice = {}
    for label, changes in {"plain": dict(distill_weight=0.0), "distill": dict(distill_weight=1e4),
                           "anchor": dict(distill_weight=0.0, anchor_weight=1e4)}.items():
        summary = _train(sw_pairs, tmp_path / label, **changes)
        items = {i["item"]: i for i in summary["retention"]["items"]}
        lattice[label] = abs(items["eos Si: lattice constant vs DFT"]["change_vs_pretrained"])
        rows = list(csv.DictReader(open(tmp_path / label / "metrics.csv")))
        assert (rows[-1]["distill_loss"] != "") == (label == "distill")
    assert lattice["plain"] > 1e-3
    assert lattice["distill"] < 0.3 * lattice["plain"] and lattice["anchor"] < 0.3 * lattice["plain"]


def test_gradient_surgery_removes_only_the_conflicting_component():
    params = list(StillingerWeber().parameters())
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    keep = [-d + 0.1 * torch.randn(d.shape, generator=gen, dtype=d.dtype) for d in data]  # points against data

    def dot(a, b):
        return sum(float((x * y).sum()) for x, y in zip(a, b))

    for p, d in zip(params, data):
        p.grad = d.clone()
    drop_conflict(params, keep)
    after = [p.grad for p in params]
    assert dot(data, keep) < 0 and abs(dot(after, keep)) < 1e-9 * dot(keep, keep)
    # what is left is the data gradient minus its projection on keep: orthogonal part unchanged
    removed = [d - a for d, a in zip(data, after)]
    scale = dot(removed, keep) / dot(keep, keep)
    assert all(torch.allclose(r, scale * k) for r, k in zip(removed, keep))
    for p, d in zip(params, data):  # a gradient that agrees with keep is left alone
        p.grad = d.clone()
    drop_conflict(params, [-k for k in keep])
    assert all(torch.equal(p.grad, d) for p, d in zip(params, data))
