"""Energy models behind one interface (see ``base.EnergyModel``) and a loader by name or file.

The adapters (CHGNet, SevenNet, MACE, classical) are imported lazily by ``load_model``, so importing
``relaxtune.potentials`` stays cheap and an optional package (mace-torch) is needed only when used.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from relaxtune.potentials.base import EnergyForces, EnergyModel, UnsupportedElementError, energy_and_forces
from relaxtune.potentials.checkpoint import DTYPES, read_checkpoint

__all__ = ["EnergyForces", "EnergyModel", "UnsupportedElementError", "energy_and_forces", "load_model",
           "load_checkpoint_model", "MODEL_CHOICES"]

MODEL_CHOICES = "chgnet, sevennet, lj, sw, a MACE model file, or a relaxtune checkpoint (.pt)"


#: a pickled reference to a class of ``mace.modules`` (GLOBAL opcode, or a STACK_GLOBAL module-name string)
_MACE_CLASS = re.compile(rb"(?:c|\x8c.)mace\.modules\.", re.DOTALL)


def is_mace_file(path: Path) -> bool:
    """A MACE model is a pickled ``mace.modules`` module: ``.model`` files, or a torch zip whose pickle names a
    mace class (a relaxtune checkpoint holds only tensors and plain values)."""
    if path.suffix == ".model":
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return any(_MACE_CLASS.search(archive.read(n)) for n in pickles)
    except (zipfile.BadZipFile, OSError):
        return False


def load_model(spec: str | Path | EnergyModel, dtype: torch.dtype = torch.float32) -> EnergyModel:
    """An energy model from a name ("chgnet", "sevennet", "lj", "sw") or a file (MACE model, relaxtune
    fine-tuned checkpoint). Raises ``ValueError`` with a one-line message for anything else."""
    if isinstance(spec, EnergyModel):
        return spec
    name = str(spec).strip()
    key = name.lower()
    if key in {"chgnet", "chgnet-0.3.0"}:
        from relaxtune.potentials.chgnet import CHGNetModel

        return CHGNetModel(dtype=dtype)
    if key in {"sevennet", "7net-0", "sevennet-0"}:
        from relaxtune.potentials.sevennet import SevenNetModel

        return SevenNetModel(dtype=dtype)
    if key in {"lj", "sw"}:
        # classical models keep float64 parameters and follow the dtype of the batch they are given
        from relaxtune.potentials import classical

        return classical.LennardJones() if key == "lj" else classical.StillingerWeber()
    path = Path(name).expanduser()
    if not path.is_file():
        if path.suffix in (".pt", ".model", ".pth") or len(path.parts) > 1:
            raise ValueError(f"{name}: no such file" + (" (a folder: give the checkpoint in it, e.g. best.pt)"
                                                        if path.is_dir() else ""))
        raise ValueError(f"unknown model {name!r}: use {MODEL_CHOICES}")
    if is_mace_file(path):
        from relaxtune.potentials.mace import MACEModel

        return MACEModel(path, dtype=dtype)
    return load_checkpoint_model(path, dtype=dtype)


def load_checkpoint_model(path: str | Path, dtype: torch.dtype | None = None):
    """The fine-tuned ``EnergyModel`` stored in a checkpoint, built by ``load_model(model_spec, dtype)`` (default:
    its training dtype; classical models keep their float64 parameters whatever ``dtype`` says)."""
    data = read_checkpoint(path)
    stored = DTYPES.get(str(data.get("dtype", "float32")), torch.float32)
    model = load_model(str(data["model_spec"]), dtype=dtype or stored)
    state = data["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit model {data['model_spec']!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    model.checkpoint_path = str(path)
    model.train_species = [str(s) for s in data.get("train_species") or []]
    return model

