"""Writing fine-tuning checkpoints: RNG states, the learned relaxation parameters.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read (tensors, numbers, strings, lists,
dicts; no pickled classes), so loading a file never runs code from it:

    format: "relaxtune-checkpoint", version: 1,
    model_spec: the base model to rebuild ("chgnet", "sw", ...; never a checkpoint path),
    model_name, dtype ("float32" | "float64"), state_dict (the model's weights),
    step_params: the relaxation parameters' state_dict or None, step_params_kwargs (their constructor
    arguments), config: the TrainConfig as a dict, epoch, metrics (validation Dq of this state),
    train_species: the elements of the training structures (what ``unseen_species`` checks against),
    trainer: (last.pt only) optimizer, scheduler, RNG states, history, early-stopping state — what
    ``resume`` needs to continue a killed run to the same result.

Reading a checkpoint back as a model lives with the models (``relaxtune.potentials.checkpoint``, and
``relaxtune.potentials.load_model``), so that loading a model never imports training code. Files are written
atomically (``relaxtune.atomic``), so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaxtune.atomic import atomic_save, atomic_write_text
from relaxtune.potentials.checkpoint import FORMAT, VERSION, read_checkpoint
from relaxtune.relax import StepParameters

__all__ = ["FORMAT", "VERSION", "atomic_save", "atomic_write_text", "load_checkpoint_step_params", "rng_state",
           "set_rng_state"]


def load_checkpoint_step_params(path: str | Path):
    """The trained relaxation parameters of a checkpoint, or None when the run did not learn them."""
    data = read_checkpoint(path)
    if data.get("step_params") is None:
        return None
    sp = StepParameters(**dict(data.get("step_params_kwargs") or {}))
    sp.load_state_dict(data["step_params"])
    return sp


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": _tuples_to_lists(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    random.setstate(_lists_to_tuples(state["python"]))


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x
