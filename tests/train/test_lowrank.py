"""Low-rank (LoRA-style) updates: the model starts pretrained, the gradient of the factors is exact, the merged
checkpoint is a plain model, and a killed low-rank run resumes to the same factors."""

import pytest
import torch
from ase.build import bulk

from relaxtune.potentials import load_checkpoint_model, load_model
from relaxtune.potentials.base import energy_and_forces
from relaxtune.state import Batch
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import Trainer, finetune
from relaxtune.train.lowrank import add_low_rank, factor_state, has_low_rank, merged_state_dict


def _energy(model, atoms):
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    ef = energy_and_forces(model, batch, model.prepare(batch))
    return ef.energy, ef.forces


def _energy_with_graph(model, atoms):
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    return model.energy(batch, model.prepare(batch)).sum()


def _si():
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=1)
    return atoms


def test_low_rank_model_starts_pretrained_and_its_gradient_is_exact():
    model = load_model("chgnet", dtype=torch.float64)
    e0, f0 = _energy(model, _si())
    counts = add_low_rank(model, 2, seed=0)
    assert has_low_rank(model) and 0 < counts["trainable"] < 0.1 * counts["frozen"]
    e1, f1 = _energy(model, _si())
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-12)
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-12)
    factors = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # move off B = 0, where the energy is flat in A
        for p in factors:
            p.add_(1e-2 * torch.randn_like(p))
    direction = [torch.randn_like(p) for p in factors]
    energy = _energy_with_graph(model, _si())
    grads = torch.autograd.grad(energy, factors, allow_unused=True)  # some heads (magnetic moments) are unused
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
    assert analytic != 0.0
    h = 1e-5

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(factors, direction):
                p.add_(sign * h * d)
            e = float(_energy(model, _si())[0].sum())
            for p, d in zip(factors, direction):
                p.sub_(sign * h * d)
        return e

    assert analytic == pytest.approx((shifted(1) - shifted(-1)) / (2 * h), rel=1e-6)


def test_merged_weights_load_into_the_base_model_and_give_the_same_forces():
    model = load_model("chgnet", dtype=torch.float64)
    add_low_rank(model, 4, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-2 * torch.randn_like(p))
    plain = load_model("chgnet", dtype=torch.float64)
    plain.load_state_dict(merged_state_dict(model))  # base names only: strict loading succeeds
    e_lr, f_lr = _energy(model, _si())
    e_pl, f_pl = _energy(plain, _si())
    torch.testing.assert_close(e_pl, e_lr, rtol=0, atol=1e-10)
    torch.testing.assert_close(f_pl, f_lr, rtol=0, atol=1e-10)
    assert not torch.allclose(f_pl, _energy(load_model("chgnet", dtype=torch.float64), _si())[1])


@pytest.mark.slow
def test_low_rank_run_writes_a_plain_checkpoint_and_resumes_to_the_same_factors(tmp_path):
    from relaxtune.data import load_pairs

    pairs = [p for p in load_pairs("builtin:si-defects") if p.name in ("vacancy_1", "sub_B_1")]
    cfg = TrainConfig(model="chgnet", objective="structure", grad="implicit", epochs=2, batch_size=2, lr=1e-3,
                      steps=60, low_rank=2, distill_weight=0.0, retention_check=False, warmup_frac=0.0)
    finetune(cfg, pairs, [], tmp_path / "straight", progress=False)
    Trainer(cfg, pairs, [], tmp_path / "killed", progress=False).run(stop_after_epoch=1)
    finetune(cfg, pairs, [], tmp_path / "killed", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["trainer"]["low_rank"] and a["trainer"]["low_rank"].keys() == b["trainer"]["low_rank"].keys()
    for k, v in a["trainer"]["low_rank"].items():
        torch.testing.assert_close(b["trainer"]["low_rank"][k], v, rtol=1e-5, atol=1e-7)
    assert any(float(v.abs().max()) > 0 for k, v in a["trainer"]["low_rank"].items() if k.endswith(".B"))
    tuned = load_checkpoint_model(str(tmp_path / "straight" / "best.pt"))
    assert not has_low_rank(tuned) and set(factor_state(tuned)) == set()
