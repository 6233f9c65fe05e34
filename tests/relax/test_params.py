"""StepParameters: values, defaults equivalent to the config, gradients into every parameter through relax()."""

import math

import pytest
import torch
from ase.build import bulk

from relaxtune.potentials.classical import StillingerWeber
from relaxtune.relax import RelaxConfig, StepParameters, relax
from relaxtune.state import Batch


def _batch():
    a = bulk("Si", "diamond", a=5.40, cubic=True)
    a.rattle(0.08, seed=1)
    b = bulk("SiC", "zincblende", a=4.36)  # two elements: per-element scales differ
    b.rattle(0.05, seed=2)
    return Batch.from_atoms([a, b], dtype=torch.float64)


def test_values():
    p = StepParameters(step_size=0.03, momentum=0.25, per_element=True)
    numbers = torch.tensor([14, 6, 14])
    v = p(numbers)
    assert v.step_size.item() == pytest.approx(0.03)
    assert v.momentum.item() == pytest.approx(0.25)
    assert torch.equal(v.atom_scale, torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        p.log_element_scale[6] = math.log(2.0)
    assert p(numbers).atom_scale.tolist() == pytest.approx([1.0, 2.0, 1.0])
    plain = StepParameters()
    assert plain.momentum is None and plain(numbers).atom_scale is None
    assert {n for n, _ in plain.named_parameters()} == {"log_step_size"}
    with pytest.raises(ValueError):
        StepParameters(momentum=0.0)
    with pytest.raises(ValueError):
        StepParameters(step_size=-1.0)


@pytest.mark.parametrize("optimizer", ["gd", "fire"])
def test_step_parameters_equal_the_config_values(optimizer):
    batch = _batch().select([0])
    model = StillingerWeber().double()
    cfg = RelaxConfig(optimizer=optimizer, fmax=0.01, max_steps=300, momentum=0.2 if optimizer == "gd" else 0.0)
    ref = relax(model, batch, cfg)
    step = cfg.step_size if optimizer == "gd" else cfg.dt
    p = StepParameters(step_size=step, momentum=0.2 if optimizer == "gd" else None, per_element=True)
    res = relax(model, batch, cfg, step_params=p)
    assert torch.equal(ref.n_steps, res.n_steps)
    assert torch.allclose(ref.batch.positions, res.batch.positions, atol=1e-12)
    faster = relax(model, batch, cfg, step_params=StepParameters(step_size=2 * step))
    assert not torch.allclose(ref.batch.positions, faster.batch.positions, atol=1e-6) or ref.n_steps != faster.n_steps


@pytest.mark.parametrize("optimizer", ["gd", "fire"])
def test_gradients_reach_every_step_parameter(optimizer):
    batch = _batch()
    model = StillingerWeber().double()
    model.check_supported = lambda b: None  # SW on SiC: just a potential for the test
    p = StepParameters(step_size=0.02 if optimizer == "gd" else 0.1,
                       momentum=0.3 if optimizer == "gd" else None, per_element=True)
    res = relax(model, batch, RelaxConfig(optimizer=optimizer, fmax=1e-9, max_steps=5), step_params=p,
                grad_mode="full")
    loss = (res.batch.positions - batch.positions).pow(2).sum()
    loss.backward()
    assert p.log_step_size.grad.abs() > 0
    if optimizer == "gd":
        assert p.momentum_logit.grad.abs() > 0
    g = p.log_element_scale.grad
    assert g[14].abs() > 0 and g[6].abs() > 0 and g[[1, 8, 26]].abs().sum() == 0


def test_per_element_scale_gradcheck():
    batch = _batch()
    model = StillingerWeber().double()
    model.check_supported = lambda b: None
    cfg = RelaxConfig(optimizer="gd", fmax=1e-9, max_steps=5, max_displacement=0.05)

    def fn(scales):
        p = StepParameters(step_size=0.02, per_element=True)
        del p.log_element_scale
        p.log_element_scale = torch.zeros(119, dtype=torch.float64).index_put((torch.tensor([6, 14]),), scales)
        return relax(model, batch, cfg, step_params=p, grad_mode="full").batch.positions.sum(0)

    assert torch.autograd.gradcheck(fn, (torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True),))
