"""Fine-tuned checkpoints: atomic writes, and loading one back as an ``EnergyModel``.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read (tensors, numbers, strings, lists,
dicts; no pickled classes), so loading a file never runs code from it:

    format: "relaxtune-checkpoint", version: 1,
    model_spec: the base model to rebuild ("chgnet", "sw", ...; never a checkpoint path),
    model_name, dtype ("float32" | "float64"), state_dict (the model's weights),
    step_params: the relaxation parameters' state_dict or None, step_params_kwargs (their constructor
    arguments), config: the TrainConfig as a dict, epoch, metrics (validation Dq of this state),
    train_species: the elements of the training structures (what :func:`unseen_species` checks against),
    trainer: (last.pt only) optimizer, scheduler, RNG states, history, early-stopping state — what
    ``resume`` needs to continue a killed run to the same result.

Files are written to a temporary name in the same directory, flushed to disk, then renamed over the target
(``os.replace``), so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "relaxtune-checkpoint"
VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float64: "float64"}.get(dtype, str(dtype).replace("torch.", ""))


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (same recipe as :func:`atomic_save`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, checked to be a relaxtune checkpoint (``ValueError`` with one line if not)."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, or pickled classes
        raise ValueError(f"{path}: not a readable relaxtune checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a relaxtune checkpoint (no format={FORMAT!r} field)")
    if int(data.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: checkpoint version {data.get('version')} is newer than this relaxtune ({VERSION})")
    return data


def base_model_spec(spec: str) -> str:
    """The base model behind ``spec``: a checkpoint path resolves to the spec it was trained from."""
    path = Path(str(spec)).expanduser()
    if path.suffix == ".pt" and path.is_file():
        return str(read_checkpoint(path)["model_spec"])
    return str(spec)


def build_base_model(spec: str, dtype: torch.dtype) -> torch.nn.Module:
    from relaxtune.potentials import load_model

    return load_model(spec, dtype=dtype)


def load_checkpoint_model(path: str | Path, dtype: torch.dtype | None = None):
    """The fine-tuned ``EnergyModel`` stored in a checkpoint, built by ``load_model(model_spec, dtype)`` (default:
    its training dtype; classical models keep their float64 parameters whatever ``dtype`` says)."""
    data = read_checkpoint(path)
    stored = _DTYPES.get(str(data.get("dtype", "float32")), torch.float32)
    model = build_base_model(str(data["model_spec"]), dtype or stored)
    state = data["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit model {data['model_spec']!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    model.checkpoint_path = str(path)
    model.train_species = [str(s) for s in data.get("train_species") or []]
    return model


def unseen_species(model, structures) -> str | None:
    """One line of warning when ``structures`` hold elements that the fine-tuning data of ``model`` (a loaded
    checkpoint) did not, else None. Fine-tuning corrects errors of the elements it saw and moves the others
    only through shared weights, in whatever direction the seen elements needed: on the shipped Si defects
    that helped Ga (its error has the sign of B's and Al's) and hurt As (opposite sign) (docs/results.md)."""
    trained = getattr(model, "train_species", None)
    if not trained:
        return None
    present = sorted({s for atoms in structures for s in atoms.get_chemical_symbols()})
    missing = [s for s in present if s not in trained]
    if not missing:
        return None
    return (f"warning: {', '.join(missing)} not in the fine-tuning data of {model.checkpoint_path} (trained on "
            f"{', '.join(trained)}): for structures with {'it' if len(missing) == 1 else 'them'} the fine-tuned "
            f"model can be better or worse than the base model")


def load_checkpoint_step_params(path: str | Path):
    """The trained relaxation parameters of a checkpoint, or None when the run did not learn them."""
    data = read_checkpoint(path)
    if data.get("step_params") is None:
        return None
    from relaxtune.relax import StepParameters

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
