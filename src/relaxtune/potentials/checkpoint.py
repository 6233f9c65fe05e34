"""Reading relaxtune checkpoints: the format's fields, its checks, the base model behind a checkpoint.

The format is written by ``relaxtune.train`` (``relaxtune.train.checkpoint`` documents every field); it is read
here, below training, so that loading a fine-tuned model needs no training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FORMAT = "relaxtune-checkpoint"
VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float64: "float64"}.get(dtype, str(dtype).replace("torch.", ""))


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
