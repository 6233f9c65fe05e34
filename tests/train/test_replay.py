"""Replay: DFT frames of other relaxations fitted at every step, drawn alike on every rank and on resume."""

import csv

import pytest
import torch

from swdata import SW_TRAINING, TRUTH, make_sw_pairs, write_sw_dataset

from relaxtune.potentials.classical import StillingerWeber
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import finetune
from relaxtune.train.replay import Replay


@pytest.fixture(scope="module")
def replay_data(tmp_path_factory):
    """SW 'DFT' relaxations (three frames each, energies and forces from the reference SW) as a dataset folder."""
    d = tmp_path_factory.mktemp("replay")
    write_sw_dataset(d, n=4, seed=5, splits={"train": ["g0", "g1", "g2", "g3"]})
    return d


def _replay(directory, model, **kw) -> Replay:
    config = TrainConfig(**{**SW_TRAINING, "objective": "structure+forces", "replay": f"{directory}:train",
                            "replay_per_step": 3, **kw})
    return Replay(config, model, torch.float64, torch.device("cpu"))


def test_replay_loss_is_zero_for_the_model_that_made_the_data_and_its_gradient_is_exact(replay_data):
    assert len(_replay(replay_data, StillingerWeber(**TRUTH)).pairs) == 4
    assert float(_replay(replay_data, StillingerWeber(**TRUTH).double()).loss(step=0).detach()) < 1e-10  # extxyz rounding
    other = StillingerWeber().double()  # the pretrained SW: wrong against the replayed data
    replay = _replay(replay_data, other)
    loss = replay.loss(step=0)
    assert float(loss.detach()) > 1e-4
    (analytic,) = torch.autograd.grad(loss, other.sigma)
    sigma0, h = other.sigma.detach().clone(), 1e-6

    def loss_at(sigma):
        other.sigma.data = sigma.clone()
        with torch.no_grad():
            return float(replay.loss(step=0))

    numeric = (loss_at(sigma0 + h) - loss_at(sigma0 - h)) / (2 * h)
    assert float(analytic) == pytest.approx(numeric, rel=1e-5)


def test_replay_is_off_without_a_spec_or_weight(replay_data):
    assert not _replay(replay_data, StillingerWeber(), replay="")
    assert not _replay(replay_data, StillingerWeber(), replay_weight=0.0)


def test_a_run_with_replay_records_its_loss_and_fits_the_replayed_data(replay_data, tmp_path):
    """Trained on Dq alone, with the replayed data from the same reference SW: the replay loss falls."""
    train = make_sw_pairs(2, seed=1)
    config = TrainConfig(**{**SW_TRAINING, "epochs": 3, "replay": f"{replay_data}:train", "replay_per_step": 2,
                            "replay_weight": 10.0, "lr": 1e-2})
    finetune(config, train, [], tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [float(r["replay_loss"]) for r in rows[1:]]
    assert rows[0]["replay_loss"] == "" and len(losses) == 3
    assert losses[-1] < 0.5 * losses[0]
