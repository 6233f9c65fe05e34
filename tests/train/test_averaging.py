"""The moving average of the weights: its arithmetic, and that validation and best.pt see it while training and
last.pt keep the trained weights."""

import math

import pytest
import torch
from swdata import SW_TRAINING as SW

from relaxtune.evaluate import evaluate
from relaxtune.potentials import load_checkpoint_model
from relaxtune.train.averaging import WeightAverage
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import Trainer


def test_the_average_moves_towards_the_weights_at_the_decay_of_its_time_constant():
    p = torch.zeros(3, dtype=torch.float64)
    average = WeightAverage([p], average_epochs=2.0, steps_per_epoch=3)
    decay = math.exp(-1.0 / 6.0)
    assert average.decay == pytest.approx(decay)
    p += 1.0
    average.update()
    p += 1.0
    average.update()
    expected = (1 - decay) * decay * 1.0 + (1 - decay) * 2.0  # from 0: two steps, to weights 1 then 2
    with average.applied():
        torch.testing.assert_close(p, torch.full((3,), expected, dtype=torch.float64))
    torch.testing.assert_close(p, torch.full((3,), 2.0, dtype=torch.float64))  # the trained weights are back


def test_no_average_leaves_the_weights_alone():
    p = torch.ones(2)
    average = WeightAverage([p], average_epochs=0.0, steps_per_epoch=5)
    p += 1.0
    average.update()
    with average.applied():
        torch.testing.assert_close(p, torch.full((2,), 2.0))
    assert average.state() == {"weight_average": []}


def test_validation_and_best_checkpoint_see_the_averaged_weights_and_last_the_trained_ones(sw_pairs, tmp_path):
    cfg = TrainConfig(**SW, grad="implicit", epochs=3, average_epochs=1.0)
    trainer = Trainer(cfg, sw_pairs[:4], sw_pairs[4:], tmp_path, progress=False)
    summary = trainer.run()
    assert summary["val_after"]["dq_mean"] < 0.95 * summary["val_before"]["dq_mean"]
    assert trainer.state.history.best["epoch"] == 3  # the last epoch: best.pt and last.pt hold the same moment
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    with trainer.state.average.applied():
        for name, value in trainer.model.state_dict().items():
            torch.testing.assert_close(best["state_dict"][name], value)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(last["state_dict"][name], value)
    assert any(not torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    # best.pt's weights give the validation Dq the run recorded for its epoch
    model = load_checkpoint_model(tmp_path / "best.pt", dtype=torch.float64)
    again = evaluate(model, sw_pairs[4:], fmax=cfg.eval_fmax, optimizer=cfg.eval_optimizer,
                     max_steps=cfg.eval_max_steps, dtype=torch.float64, start=cfg.val_start)
    assert again.metrics["dq_mean"] == pytest.approx(summary["val_after"]["dq_mean"], rel=1e-9)
