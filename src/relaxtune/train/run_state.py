"""A run's state besides the weights, and the checkpoints that hold it: ``best.pt`` (weights) and ``last.pt``
(weights plus everything ``resume`` needs to continue a killed run to the same result; the data order and
frame draws of each epoch are seeded by (seed, epoch), so no global state is needed beyond the RNGs)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from relaxtune.potentials.base import EnergyModel
from relaxtune.train import checkpoint as ckpt
from relaxtune.train.averaging import WeightAverage
from relaxtune.train.config import TrainConfig
from relaxtune.train.history import History
from relaxtune.train.lowrank import factor_state, has_low_rank, load_factor_state, merged_state_dict
from relaxtune.train.summary import Movement, jsonable
from relaxtune.train.warm_start import WarmStarts


@dataclass
class RunState:
    """The epochs done, their history, the warm starts, θ0 (``Movement``), the weights' moving average, the
    pretrained Dq of each training structure (``dq_scale="pretrained"``, in training order) and the wall time of
    earlier sessions."""

    history: History
    warm: WarmStarts
    movement: Movement
    average: WeightAverage
    epoch: int = 0
    dq_scale: list[float] = field(default_factory=list)
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        """Seconds trained, over every session of the run."""
        return self.elapsed_before + (time.time() - self.started)

    def entry(self, optimizer: torch.optim.Optimizer, scheduler: Any, model: EnergyModel) -> dict[str, Any]:
        """last.pt's ``trainer`` entry."""
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "low_rank": factor_state(model),
            "history": json.dumps(jsonable(self.history.rows)),
            "best": json.dumps(jsonable(self.history.best)),
            "bad_epochs": self.history.bad_epochs,
            "stopped_early": self.history.stopped_early,
            **self.movement.state(),
            "elapsed": self.elapsed(),
            "dq_scale": self.dq_scale,
            **self.warm.state(),
            **self.average.state(),
        }

    def load(self, data: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
             model: EnergyModel) -> None:
        """Continue from a last.pt ``data``: the model's weights (only the low-rank factors where the model has
        them: the base weights are the pretrained ones), optimizer, schedule, RNGs and this state."""
        tr = data["trainer"]
        if has_low_rank(model):
            load_factor_state(model, tr.get("low_rank") or {})
        else:
            model.load_state_dict(data["state_dict"])
        optimizer.load_state_dict(tr["optimizer"])
        scheduler.load_state_dict(tr["scheduler"])
        ckpt.set_rng_state(tr["rng"])
        self.history.rows = json.loads(tr["history"])
        self.history.best = json.loads(tr["best"])
        self.history.bad_epochs = int(tr["bad_epochs"])
        self.history.stopped_early = bool(tr["stopped_early"])
        self.movement.load(tr)
        self.elapsed_before = float(tr.get("elapsed", 0.0))
        self.dq_scale = [float(v) for v in tr.get("dq_scale") or []]
        self.warm.load(tr)
        self.average.load(tr)
        self.epoch = int(data["epoch"])


def checkpoint_payload(model: EnergyModel, config: TrainConfig, *, model_spec: str, step_params: Any,
                       step_params_kwargs: dict | None, epoch: int, metrics: dict[str, Any] | None,
                       train_species: list[str], trainer: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint (the format of ``relaxtune.train.checkpoint``): merged weights, relaxation parameters,
    config, validation metrics and, for last.pt, the ``trainer`` entry."""
    data = {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "model_spec": model_spec,
        "model_name": model.name,
        "dtype": config.dtype,
        "state_dict": merged_state_dict(model),
        "step_params": step_params.state_dict() if step_params is not None else None,
        "step_params_kwargs": step_params_kwargs,
        "config": config.to_dict(),
        "epoch": epoch,
        "metrics": jsonable(metrics) if metrics else {},
        "train_species": train_species,
    }
    if trainer is not None:
        data["trainer"] = trainer
    return data
