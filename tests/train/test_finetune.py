"""The trainer: lowers Dq, parameter groups, skips blow-ups, resumes to the same result, forces baseline,
and a short real CHGNet fine-tune on real DFT pairs."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from swdata import SW_TRAINING as SW, make_cell_relaxation

import relaxtune.train as train_package
from relaxtune.potentials.chgnet import CHGNetModel
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.potentials.mace import MACEModel
from relaxtune.potentials.sevennet import SevenNetModel
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import Trainer, finetune
from relaxtune.train.parameters import lr_factor, select_trainable


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def measure(parts):
    """An objective's ``StepLoss``, its pieces of loss left undifferentiated."""
    while True:
        try:
            next(parts)
        except StopIteration as done:
            return done.value


@pytest.mark.parametrize("grad", ["full", "implicit", "hybrid", "checkpoint", "truncated"])
def test_every_grad_mode_lowers_validation_dq(sw_pairs, tmp_path, grad):
    cfg = TrainConfig(**SW, grad=grad, epochs=3, truncate_steps=20, hybrid_steps=5)
    s = finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    assert s["val_after"]["dq_mean"] < 0.9 * s["val_before"]["dq_mean"]
    assert s["train_loss_last_epoch"] < s["train_loss_first_epoch"]
    for name in ("best.pt", "last.pt", "metrics.csv", "summary.json"):
        assert (tmp_path / name).exists()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["epochs_run"] == 3


def test_step_size_sets_the_training_relaxation_and_the_learnable_start(sw_pairs, tmp_path):
    gd = Trainer(TrainConfig(**SW, step_size=0.05), sw_pairs[:2], sw_pairs[2:3], tmp_path / "gd", progress=False)
    assert gd.objectives.relax_config().step_size == 0.05
    fire = TrainConfig(**{**SW, "optimizer": "fire"}, step_size=0.3)
    fire_trainer = Trainer(fire, sw_pairs[:2], sw_pairs[2:3], tmp_path / "fire", progress=False)
    assert fire_trainer.objectives.relax_config().dt == 0.3
    assert TrainConfig(**SW).relax_step_size == 0.02 and TrainConfig(**{**SW, "optimizer": "fire"}).relax_step_size == 0.1
    learn = Trainer(TrainConfig(**SW, step_size=0.01, learn_step=True), sw_pairs[:2], sw_pairs[2:3],
                    tmp_path / "learn", progress=False)
    assert learn.step_params.step_size.item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="step_size"):
        TrainConfig(**SW, step_size=0.0)


def test_learn_step_moves_relaxation_parameters_and_reports_movement(sw_pairs, tmp_path):
    cfg = TrainConfig(**SW, grad="full", epochs=2, learn_step=True, step_lr=0.05)
    s = finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    mv = s["parameter_movement"]
    assert mv["model"]["relative"] > 0 and mv["relax"]["relative"] > 0
    assert s["step_size_after"] != s["step_size_before"]
    assert set(mv["model_by_module"]) == {"A", "B", "epsilon", "gamma", "lambda1", "sigma"}
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[1]["grad_norm_model"]) > 0 and float(rows[1]["grad_norm_relax"]) > 0
    # implicit: a fixed point does not depend on the step size, so it gets no gradient
    notes: list[str] = []
    s2 = finetune(cfg.replace(grad="implicit"), sw_pairs[:4], sw_pairs[4:], tmp_path / "imp", progress=False,
                  log=notes.append)
    assert s2["parameter_movement"]["relax"]["absolute"] == 0.0
    assert any("step size gets no gradient" in n for n in notes)  # and the log says so up front


@pytest.mark.parametrize("average_epochs", [0.0, 1.5])
def test_resume_after_kill_gives_the_same_weights(sw_pairs, tmp_path, average_epochs):
    cfg = TrainConfig(**SW, grad="full", epochs=4, learn_step=True, average_epochs=average_epochs)
    straight = tmp_path / "straight"
    finetune(cfg, sw_pairs[:4], sw_pairs[4:], straight, progress=False)
    killed = tmp_path / "killed"
    Trainer(cfg, sw_pairs[:4], sw_pairs[4:], killed, progress=False).run(stop_after_epoch=2)
    assert not (killed / "summary.json").exists()
    assert len(list(csv.DictReader(open(killed / "metrics.csv")))) == 3
    torch.manual_seed(1234)  # a fresh process has other RNG state: resume must not depend on it
    finetune(cfg, sw_pairs[:4], sw_pairs[4:], killed, resume=True, progress=False)
    for name in ("last.pt", "best.pt"):
        a, b = _weights(straight / name), _weights(killed / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
    sa = torch.load(straight / "last.pt", weights_only=True)["step_params"]
    sb = torch.load(killed / "last.pt", weights_only=True)["step_params"]
    torch.testing.assert_close(sa["log_step_size"], sb["log_step_size"], rtol=1e-12, atol=1e-14)
    ra = list(csv.DictReader(open(straight / "metrics.csv")))
    rb = list(csv.DictReader(open(killed / "metrics.csv")))
    assert [r["val_dq_mean"] for r in ra] == [r["val_dq_mean"] for r in rb]


def test_blown_up_relaxations_are_skipped_and_counted(sw_pairs, tmp_path):
    bad = sw_pairs[0]
    squashed = bad.initial.copy()
    squashed.positions[1] = squashed.positions[0] + [0.05, 0.0, 0.0]  # two atoms on top of each other
    broken = type(bad)(name="broken", group="x", initial=squashed, final=bad.final)
    cfg = TrainConfig(**{**SW, "batch_size": 3}, grad="full", epochs=1, max_force=50.0)
    s = finetune(cfg, [broken] + sw_pairs[1:3], sw_pairs[4:], tmp_path, progress=False)
    assert s["skipped_structures"] >= 1
    assert all(math.isfinite(float(v)) for v in _weights(tmp_path / "last.pt").values())
    assert s["parameter_movement"]["model"]["relative"] > 0  # the healthy structures still trained


def test_forces_objective_baseline_runs_and_lowers_force_error(sw_pairs, tmp_path):
    cfg = TrainConfig(**{**SW, "objective": "forces"}, epochs=3)
    s = finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    assert s["train_loss_last_epoch"] < s["train_loss_first_epoch"]
    assert s["parameter_movement"]["model"]["relative"] > 0


def test_structure_plus_forces_adds_each_structures_mean_frame_loss(sw_pairs, tmp_path):
    pairs = sw_pairs[:2]
    cfg = TrainConfig(**{**SW, "objective": "structure+forces"}, forces_mix=7.0, frames_per_structure=0)  # all frames
    trainer = Trainer(cfg, pairs, [], tmp_path, progress=False)
    combined = measure(trainer.objectives.combined(pairs, epoch=1))
    structure = measure(trainer.objectives.structure(pairs)).loss_sum
    frame_means = [measure(trainer.objectives.forces([p])).loss_sum for p in pairs]  # one structure: its frame mean
    assert combined.n_ok == 2 and not combined.blew.any() and min(frame_means) > 0
    assert combined.loss_sum == pytest.approx(structure + 7.0 * sum(frame_means), rel=1e-9)


def test_structure_plus_forces_objective_lowers_validation_dq(sw_pairs, tmp_path):
    cfg = TrainConfig(**{**SW, "objective": "structure+forces"}, forces_mix=1.0, epochs=3)
    s = finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    assert s["val_after"]["dq_mean"] < 0.9 * s["val_before"]["dq_mean"]
    assert s["train_loss_last_epoch"] < s["train_loss_first_epoch"]


def test_start_relaxed_begins_training_relaxations_at_the_reference_structure(sw_pairs, tmp_path):
    pairs = sw_pairs[:2]
    stats = {}
    for start in ("initial", "relaxed"):
        trainer = Trainer(TrainConfig(**{**SW, "start": start}), pairs, [], tmp_path / start, progress=False)
        stats[start] = measure(trainer.objectives.structure(pairs))
    # from the DFT minimum the model only slides into its own nearby minimum: fewer steps for every structure
    assert all(r < i for r, i in zip(stats["relaxed"].relaxations.steps, stats["initial"].relaxations.steps))
    with pytest.raises(ValueError, match="start"):
        TrainConfig(**{**SW, "start": "middle"})


def test_start_relaxed_lowers_validation_dq_from_initial_structures(sw_pairs, tmp_path):
    cfg = TrainConfig(**{**SW, "start": "relaxed"}, epochs=3)
    s = finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    assert s["val_after"]["dq_mean"] < 0.9 * s["val_before"]["dq_mean"]


def test_val_start_relaxed_validates_the_offset_of_the_models_minimum(sw_pairs, tmp_path):
    from relaxtune.evaluate import evaluate

    cfg = TrainConfig(**{**SW, "val_start": "relaxed"}, epochs=1)
    s = finetune(cfg, sw_pairs[:2], sw_pairs[4:], tmp_path, progress=False)
    expected = evaluate(StillingerWeber(), sw_pairs[4:], fmax=cfg.eval_fmax, optimizer=cfg.eval_optimizer,
                        start="relaxed")
    assert s["val_before"]["dq_mean"] == pytest.approx(expected.metrics["dq_mean"], rel=1e-9)
    assert s["config"]["val_start"] == "relaxed"


def test_early_stopping(sw_pairs, tmp_path):
    cfg = TrainConfig(**{**SW, "lr": 1e-9}, grad="implicit", epochs=6, patience=1, min_delta=1e-3)
    s = finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    assert s["stopped_early"] and s["epochs_run"] == 1


def test_select_trainable_chgnet_names():
    from relaxtune.potentials import load_model

    model = load_model("chgnet")
    counts = select_trainable(model, "readout")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".mlp." in n or ".readout_norm." in n for n in names)
    assert counts["trainable"] < 0.1 * (counts["trainable"] + counts["frozen"])
    select_trainable(model, "freeze-embeddings")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("atom_embedding" in n for n in frozen) and any("angle_embedding" in n for n in frozen)
    assert not any("atom_conv_layers" in n for n in frozen)
    with pytest.raises(ValueError):
        select_trainable(StillingerWeber(), "no_such_parameter")


def test_select_trainable_follows_the_modules_the_model_declares():
    sw = StillingerWeber()  # declares none: readout is the last top-level module with parameters
    select_trainable(sw, "readout")
    assert [n for n, p in sw.named_parameters() if p.requires_grad] == ["gamma"]
    with pytest.raises(ValueError, match="declares no embedding modules"):
        select_trainable(sw, "freeze-embeddings")


def test_training_code_names_no_modules_of_a_model():
    """Readout and embedding modules are the adapters' to declare (``EnergyModel.readout_modules``, ...)."""
    declared = {name for cls in (CHGNetModel, SevenNetModel, MACEModel)
                for role in ("readout_modules", "embedding_modules", "element_embedding_modules")
                for name in getattr(cls, role)}
    assert {"mlp", "atom_embedding", "onehot_to_feature_x", "node_embedding"} <= declared
    for path in Path(train_package.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert [n for n in sorted(declared) if re.search(rf"\b{n}\b", text)] == [], path.name


@pytest.mark.parametrize("objective, grad", [("structure", "full"), ("structure+forces", "implicit"),
                                             ("forces", "implicit")])
def test_objectives_compute_the_loss_and_the_trainer_differentiates_it(sw_pairs, tmp_path, objective, grad):
    pairs = sw_pairs[:2]
    trainer = Trainer(TrainConfig(**{**SW, "objective": objective}, grad=grad), pairs, [], tmp_path, progress=False)
    parts, pieces = trainer.objectives.loss(pairs, epoch=1), []
    while True:
        try:
            pieces.append(next(parts))
        except StopIteration as done:
            step = done.value
            break
    assert pieces and all(p.grad is None for p in trainer.model_params)  # nothing differentiated yet
    assert float(sum(pieces).detach()) == pytest.approx(step.total / step.weight, rel=1e-12)
    expected = torch.autograd.grad(sum(pieces), trainer.model_params)
    again = trainer._backward(trainer.objectives.loss(pairs, epoch=1))  # the trainer's backward, piece by piece
    assert again.total == pytest.approx(step.total, rel=1e-12)
    for p, g in zip(trainer.model_params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


def test_lr_schedule_warmup_then_cosine():
    f = lr_factor(TrainConfig(warmup_frac=0.2, min_lr_ratio=0.1), total_steps=10)
    values = [f(s) for s in range(10)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
    assert values[-1] > 0.1 - 1e-12


@pytest.mark.slow
def test_real_chgnet_finetune_on_two_real_dft_pairs_lowers_training_dq(tmp_path):
    from relaxtune.data import load_pairs

    # two stable training-split relaxations from the seed set (always shipped); a structure that the model relaxes
    # into another configuration (int_B_1) would make "training Dq falls in 2 epochs" a coin toss
    pairs = [p for p in load_pairs("builtin:si-defects") if p.name in ("vacancy_1", "sub_B_1")]
    assert len(pairs) == 2 and all(p.split == "train" for p in pairs)
    # FIRE: a warm-started L-BFGS relaxation, converged well below fmax, may take no step in epoch 2 at this lr,
    # and the loss then repeats epoch 1's exactly (its gradient still flows)
    # Without orthogonal updates (tests/train/test_orthogonal.py runs them on CHGNet): with them, at this lr, the
    # training loss of epoch 2 equalled epoch 1's to 7 digits.
    cfg = TrainConfig(model="chgnet", objective="structure", grad="implicit", optimizer="fire", epochs=2,
                      batch_size=2, lr=1e-4, steps=100, warmup_frac=0.0, schedule="constant", retention_check=False,
                      distill_orthogonal=False)
    s = finetune(cfg, pairs, [], tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    first, last = float(rows[1]["train_loss"]), float(rows[2]["train_loss"])
    assert last < first, (first, last)
    assert s["parameter_movement"]["model"]["relative"] > 0


def test_a_batch_whose_relaxation_raises_is_skipped_not_fatal(sw_pairs, tmp_path):
    import numpy as np

    bad = sw_pairs[0]
    nan = bad.initial.copy()
    nan.positions[2] = np.nan
    broken = type(bad)(name="nan", group="x", initial=nan, final=bad.final)
    cfg = TrainConfig(**{**SW, "batch_size": 1}, grad="implicit", epochs=1)
    s = finetune(cfg, [broken, sw_pairs[1]], sw_pairs[4:], tmp_path, progress=False, log=lambda m: None)
    assert s["skipped_batches"] + s["skipped_structures"] >= 1
    assert s["parameter_movement"]["model"]["relative"] > 0


def test_summary_has_per_structure_validation_dq(sw_pairs, tmp_path):
    cfg = TrainConfig(**SW, grad="implicit", epochs=1)
    s = finetune(cfg, sw_pairs[:2], sw_pairs[4:], tmp_path, progress=False)
    before, after = s["val_dq_by_structure_before"], s["val_dq_by_structure_after"]
    assert set(before) == {"sw4", "sw5"} and set(after) == {"sw4", "sw5"}
    assert sum(before.values()) / 2 == pytest.approx(s["val_before"]["dq_mean"])


def test_dq_scale_pretrained_divides_each_structures_dq_by_the_pretrained_one(sw_pairs, tmp_path):
    pairs = sw_pairs[:3]
    absolute = Trainer(TrainConfig(**SW), pairs, [], tmp_path / "a", progress=False)
    per_structure = [measure(absolute.objectives.structure([p])).loss_sum for p in pairs]  # pretrained Dq each
    relative = Trainer(TrainConfig(**{**SW, "dq_scale": "pretrained"}, dq_scale_floor=1e-6), pairs, [], tmp_path / "r",
                       progress=False)
    relative.state.dq_scale = relative._measure_dq_scale()
    assert relative.state.dq_scale == pytest.approx(per_structure, rel=1e-6)
    step = measure(relative.objectives.structure(pairs))
    assert step.n_ok == 3 and step.loss_sum == pytest.approx(3.0, rel=1e-6)  # every structure at its own pretrained Dq
    floored = Trainer(TrainConfig(**{**SW, "dq_scale": "pretrained"}, dq_scale_floor=10.0), pairs, [], tmp_path / "f",
                      progress=False)
    assert floored._measure_dq_scale() == [10.0] * 3
    with pytest.raises(ValueError, match="dq_scale"):
        TrainConfig(**{**SW, "dq_scale": "log"})


def test_dq_scale_pretrained_trains_and_resumes_with_the_stored_scales(sw_pairs, tmp_path):
    cfg = TrainConfig(**{**SW, "dq_scale": "pretrained"}, epochs=2)
    s = finetune(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    assert s["train_loss_last_epoch"] < s["train_loss_first_epoch"] <= 1.0 + 1e-6
    stored = torch.load(tmp_path / "last.pt", weights_only=False)["trainer"]["dq_scale"]
    assert len(stored) == 4 and min(stored) > 0
    resumed = Trainer(cfg.replace(epochs=3), sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    resumed._restore(tmp_path / "last.pt")
    assert resumed.state.dq_scale == pytest.approx(stored)


def test_a_stored_config_that_predates_a_field_keeps_the_old_behaviour():
    old = TrainConfig(**SW).to_dict()
    for name in ("start", "val_start", "dq_scale", "energy_scale"):
        old.pop(name)
    restored = TrainConfig.from_dict(old)
    assert (restored.start, restored.val_start, restored.dq_scale, restored.energy_scale) == (
        "initial", "initial", "absolute", "per-atom")
    today = TrainConfig()
    assert (today.start, today.dq_scale) == ("relaxed", "pretrained")
    assert TrainConfig.from_dict(today.to_dict()) == today


def test_embedding_lr_needs_a_model_with_per_element_embeddings(sw_pairs, tmp_path):
    with pytest.raises(ValueError, match="embedding_lr"):
        Trainer(TrainConfig(**SW, embedding_lr=1e-2), sw_pairs[:2], [], tmp_path, progress=False)
    with pytest.raises(ValueError, match="embedding_lr"):
        TrainConfig(embedding_lr=0.0)


@pytest.mark.slow
def test_embedding_lr_trains_the_rows_of_the_elements_present_at_their_own_rate(tmp_path):
    from relaxtune.data import load_pairs

    pairs = [p for p in load_pairs("builtin:si-defects") if p.name == "sub_B_1"]
    cfg = TrainConfig(model="chgnet", epochs=1, batch_size=1, lr=1e-5, embedding_lr=1e-2, steps=60,
                      warmup_frac=0.0, schedule="constant", dq_scale="absolute", retention_check=False)
    trainer = Trainer(cfg, pairs, [], tmp_path, progress=False, log=lambda m: None)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"model", "elements"} and groups["elements"]["lr"] == 1e-2
    table = dict(trainer.model.named_parameters())["model.atom_embedding.embedding.weight"]
    before = table.detach().clone()
    shared = [p.detach().clone() for p in groups["model"]["params"]]
    trainer.run()
    moved = (table.detach() - before).norm(dim=1)
    z_b, z_si, z_ge = 5 - 1, 14 - 1, 32 - 1  # CHGNet's table is indexed by Z - 1
    assert moved[z_b] > 0 and moved[z_si] > 0 and moved[z_ge] == 0  # Ge is not in the data: untouched
    row_step = float(moved[z_b] / before[z_b].norm())
    shared_step = float(torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(groups["model"]["params"], shared)])
                        .norm() / torch.cat([s.reshape(-1) for s in shared]).norm())
    assert row_step > 10 * shared_step, (row_step, shared_step)


def test_default_objective_trains_on_dq_alone_when_pairs_carry_no_dft_energies(tmp_path):
    """structure+forces is the default; pairs read from bare structure files (no energies or forces) have no
    frames, so the loss is Dq alone rather than an error."""
    from swdata import make_sw_pairs

    from relaxtune.data.pairs import dft_frames

    pairs = make_sw_pairs(2, with_trajectory=False)
    assert not any(dft_frames(p) for p in pairs)  # bare structures: no DFT frame to fit
    assert TrainConfig().objective == "structure+forces"
    trainer = Trainer(TrainConfig(**{**SW, "objective": "structure+forces"}), pairs, [], tmp_path, progress=False)
    combined = measure(trainer.objectives.combined(pairs, epoch=1))
    structure = measure(trainer.objectives.structure(pairs))
    assert combined.n_ok == 2 and combined.loss_sum == pytest.approx(structure.loss_sum, rel=1e-9)


def test_frames_with_a_dft_stress_add_a_stress_term_with_a_correct_gradient(tmp_path):
    import numpy as np
    from ase.units import GPa

    from relaxtune.calculator import RelaxtuneCalculator

    pair, frames = make_cell_relaxation()
    assert abs(frames[0].get_stress()).max() / GPa > 1.0  # the strained start is under a stress of GPa
    terms = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig(**{**SW, "objective": "forces", "start": "relaxed"}, stress_weight=weight)
        trainer = Trainer(cfg, [pair], [], tmp_path / str(weight), progress=False)
        terms[weight] = trainer.frames.terms(frames[-1], frames)
    model_stress = []
    for frame in frames:  # the untuned SW's stress, through ASE
        atoms = frame.copy()
        atoms.calc = RelaxtuneCalculator(StillingerWeber().double())
        model_stress.append(atoms.get_stress(voigt=False))
    expected = [np.mean(((s - f.get_stress(voigt=False)) / GPa) ** 2) for s, f in zip(model_stress, frames)]
    np.testing.assert_allclose((terms[1.0] - terms[0.0]).detach().numpy(), expected, rtol=1e-6)
    assert min(expected) > 0.1  # GPa^2: the untuned SW has another lattice constant
    # d(stress term)/d(sigma): autograd against a central finite difference
    cfg = TrainConfig(**{**SW, "objective": "forces", "start": "relaxed"}, stress_weight=1.0, energy_weight=0.0,
                      force_weight=0.0)
    trainer = Trainer(cfg, [pair], [], tmp_path / "fd", progress=False)
    sigma = trainer.model.sigma
    loss = trainer.frames.terms(frames[-1], frames).sum()
    (grad,) = torch.autograd.grad(loss, sigma)
    h = 1e-6
    with torch.no_grad():
        values = []
        for step in (h, -h):
            sigma.add_(step)
            values.append(float(trainer.frames.terms(frames[-1], frames).sum()))
            sigma.sub_(step)
    assert float(grad) == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-5)


def test_a_stress_on_the_relaxed_frame_only_enters_that_frame(tmp_path):
    """A fixed-cell dataset may carry the DFT stress of its relaxed frame alone: that frame gets the stress
    term, the others keep their energy/force terms unchanged."""
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    pair, frames = make_cell_relaxation()
    start = frames[0].copy()
    start.calc = SinglePointCalculator(start, energy=frames[0].get_potential_energy(), forces=frames[0].get_forces())
    mixed = [start, frames[1]]
    terms = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig(**{**SW, "objective": "forces", "start": "relaxed"}, stress_weight=weight)
        trainer = Trainer(cfg, [pair], [], tmp_path / str(weight), progress=False)
        terms[weight] = trainer.frames.terms(frames[-1], mixed).detach().numpy()
        full = trainer.frames.terms(frames[-1], frames).detach().numpy()
    diff = terms[1.0] - terms[0.0]
    assert diff[0] == 0.0 and diff[1] > 0.1  # GPa^2: the untuned SW has another lattice constant
    np.testing.assert_allclose(terms[1.0][1], full[1], rtol=1e-10)  # as when every frame has a stress


def test_fixed_cell_stress_is_fitted_only_when_asked(tmp_path):
    """The stress on a fixed-cell relaxation's frames (the shipped Si defects' relaxed frame) stays out of the
    loss unless ``fixed_cell_stress``; a cell relaxation's stress is always in."""
    import dataclasses

    cell_pair, _ = make_cell_relaxation()
    fixed_pair = dataclasses.replace(cell_pair, name="fixed", relax_cell=False)
    totals = {}
    for opt_in in (False, True):
        for weight in (0.0, 1.0):
            cfg = TrainConfig(**{**SW, "objective": "forces", "start": "relaxed"}, stress_weight=weight,
                              fixed_cell_stress=opt_in)
            trainer = Trainer(cfg, [cell_pair], [], tmp_path / f"{opt_in}{weight}", progress=False)
            for pair in (cell_pair, fixed_pair):
                totals[opt_in, weight, pair.name] = sum(
                    float(trainer.frames.terms(ref, frames, use_stress).sum())
                    for _, ref, frames, _, use_stress in trainer.frames.chunks([pair]))
    assert totals[False, 1.0, "fixed"] == totals[False, 0.0, "fixed"]
    assert totals[True, 1.0, "fixed"] > totals[True, 0.0, "fixed"] + 0.1
    for opt_in in (False, True):
        assert totals[opt_in, 1.0, "si8_cell"] > totals[opt_in, 0.0, "si8_cell"] + 0.1


def test_energy_scale_total_fits_the_relative_energy_in_eV_not_per_atom(tmp_path):
    """The energy term is the squared error of (E_frame - E_relaxed): per atom by default, in total eV with
    ``energy_scale="total"``; checked against the untuned SW's energies through ASE."""
    from relaxtune.calculator import RelaxtuneCalculator

    pair, frames = make_cell_relaxation(vacancy=True)
    n_atoms = len(frames[0])
    model_energy = []
    for frame in frames:
        atoms = frame.copy()
        atoms.calc = RelaxtuneCalculator(StillingerWeber().double())
        model_energy.append(atoms.get_potential_energy())
    error = (model_energy[0] - model_energy[-1]) - (frames[0].get_potential_energy() - frames[-1].get_potential_energy())
    assert abs(error) > 1e-3  # the untuned SW has another energy landscape
    terms = {}
    for scale in ("per-atom", "total"):
        cfg = TrainConfig(**{**SW, "objective": "forces", "start": "relaxed"}, force_weight=0.0, stress_weight=0.0,
                          energy_scale=scale)
        trainer = Trainer(cfg, [pair], [], tmp_path / scale, progress=False)
        terms[scale] = trainer.frames.terms(frames[-1], frames).detach().numpy()
    assert terms["total"][0] == pytest.approx(error**2, rel=1e-6)
    assert terms["per-atom"][0] == pytest.approx((error / n_atoms) ** 2, rel=1e-6)
    assert terms["total"][-1] == pytest.approx(0.0, abs=1e-20)  # the relaxed frame is the energy reference
    with pytest.raises(ValueError, match="energy_scale"):
        TrainConfig(energy_scale="per-structure")


def test_the_energy_term_defaults_follow_the_objective_and_explicit_values_win():
    """Unset, the baseline fits energies per atom with weight 1 (CHGNet's convention) and the structure
    objectives in total eV with weight 0.1; a value given is kept, for every objective."""
    unset = {o: (TrainConfig(objective=o).energy_scale, TrainConfig(objective=o).energy_weight)
             for o in ("forces", "structure", "structure+forces")}
    assert unset == {"forces": ("per-atom", 1.0), "structure": ("total", 0.1), "structure+forces": ("total", 0.1)}
    assert TrainConfig().energy_scale == "total"
    for objective in unset:
        given = TrainConfig(objective=objective, energy_scale="per-atom", energy_weight=2.0)
        assert (given.energy_scale, given.energy_weight) == ("per-atom", 2.0)


def test_training_from_the_initial_structure_of_a_cell_relaxation_is_refused(tmp_path):
    pair, _ = make_cell_relaxation()
    with pytest.raises(ValueError, match="'si8_cell'.*relaxed the cell.*--start relaxed"):
        Trainer(TrainConfig(**SW), [pair], [], tmp_path / "a", progress=False)
    Trainer(TrainConfig(**{**SW, "start": "relaxed"}), [pair], [], tmp_path / "b", progress=False)
    Trainer(TrainConfig(**{**SW, "objective": "forces"}), [pair], [], tmp_path / "c", progress=False)


def test_start_relaxed_trains_on_cell_relaxed_pairs_with_their_stress(tmp_path):
    pair, _ = make_cell_relaxation(vacancy=True)
    cfg = TrainConfig(**{**SW, "objective": "structure+forces", "start": "relaxed"}, forces_mix=1.0, epochs=3)
    s = finetune(cfg, [pair], [pair], tmp_path, progress=False)
    assert s["val_before"]["dq_mean"] > 1e-3  # the vacancy's neighbours sit where the potential puts them
    assert s["val_after"]["dq_mean"] < 0.7 * s["val_before"]["dq_mean"]
    assert s["train_loss_last_epoch"] < s["train_loss_first_epoch"]


def test_data_without_dft_frames_is_said_and_recorded_not_silently_dq_only(tmp_path):
    from swdata import make_sw_pairs

    from relaxtune.data.pairs import dft_frames

    bare = make_sw_pairs(2, with_trajectory=False)
    for pair in bare:
        pair.initial.calc = None
        pair.final.calc = None
    assert all(dft_frames(p) == [] for p in bare)
    said = []
    trainer = Trainer(TrainConfig(**{**SW, "objective": "structure+forces"}), bare, [], tmp_path, log=said.append)
    assert trainer.objective_used == "structure" and any("trains on Dq alone" in m for m in said)
    assert trainer.summary()["objective_used"] == "structure"
    with pytest.raises(ValueError, match="no training structure carries DFT energies"):
        Trainer(TrainConfig(**{**SW, "objective": "forces"}), bare, [], tmp_path / "f", log=said.append)
