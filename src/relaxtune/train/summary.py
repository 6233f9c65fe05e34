"""``summary.json``: a run's before / after validation metrics, and how far each parameter group moved.

The movement is ||θ-θ0|| / ||θ0|| of the model's weights, of the relaxation's parameters and of each model
module. Under Adam every parameter moves about ``lr`` per step whatever its gradient, so the ratio reflects the
learning rates as much as the loss; ``metrics.csv`` records each group's gradient norm per epoch as well.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from relaxtune.train.config import TrainConfig
from relaxtune.train.history import VAL_KEYS, History


def flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parameters as one detached float64 vector on the CPU."""
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in params])


def movement(now: torch.Tensor, start: torch.Tensor) -> dict[str, float]:
    """||θ-θ0||, ||θ0|| and their ratio."""
    diff = float(torch.linalg.vector_norm(now - start)) if now.numel() else 0.0
    base = float(torch.linalg.vector_norm(start)) if start.numel() else 0.0
    return {"relative": diff / base if base > 0 else (0.0 if diff == 0 else math.inf),
            "absolute": diff, "initial_norm": base, "n": int(start.numel())}


class Movement:
    """The trainable parameters where training started (θ0), to measure how far they moved."""

    def __init__(self, model: torch.nn.Module, relax_params: Sequence[torch.Tensor]):
        self.model = model
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.relax_params = list(relax_params)
        self.module_names = sorted({".".join(n.split(".")[:2]) for n, p in model.named_parameters()
                                    if p.requires_grad})
        self.theta0_model = flat(self.model_params)
        self.theta0_relax = flat(self.relax_params)
        self.theta0_modules = {m: flat(self._module_params(m)) for m in self.module_names}

    def _module_params(self, prefix: str) -> list[torch.Tensor]:
        return [p for n, p in self.model.named_parameters() if p.requires_grad and
                (n == prefix or n.startswith(prefix + "."))]

    def report(self) -> dict[str, Any]:
        """``parameter_movement`` of summary.json: model, relax (when learned) and model_by_module."""
        moved: dict[str, Any] = {"model": movement(flat(self.model_params), self.theta0_model)}
        if self.relax_params:
            moved["relax"] = movement(flat(self.relax_params), self.theta0_relax)
        moved["model_by_module"] = {m: movement(flat(self._module_params(m)), self.theta0_modules[m])["relative"]
                                    for m in self.module_names if m in self.theta0_modules}
        return moved

    def state(self) -> dict[str, Any]:
        return {"theta0_model": self.theta0_model, "theta0_relax": self.theta0_relax,
                "theta0_modules": self.theta0_modules}

    def load(self, state: dict[str, Any]) -> None:
        self.theta0_model = state["theta0_model"]
        self.theta0_relax = state["theta0_relax"]
        self.theta0_modules = dict(state["theta0_modules"])


def run_summary(config: TrainConfig, history: History, *, model_spec: str, train_names: list[str],
                val_names: list[str], counts: dict[str, int], objective_used: str, epochs_run: int,
                moved: dict[str, Any], time_s: float, step_size: tuple[float, float] | None,
                data: str | None = None) -> dict[str, Any]:
    """The summary of a run: before (epoch 0), after (best epoch) and last validation metrics, training loss,
    skips, parameter movement, with ``learn_step`` the step size (before, after), and ``data``, the dataset the
    training structures came from (``relaxtune.data.load.dataset_of``; the report's default data)."""
    before = history.rows[0] if history.rows else {}
    best_epoch = history.best["epoch"] if history.best else None
    best_row = history.row_of(best_epoch)
    last_row = history.rows[-1] if history.rows else {}

    def pick(row: dict[str, Any]) -> dict[str, Any]:
        return {k: row.get(f"val_{k}") for k in VAL_KEYS}

    out = {
        "config": config.to_dict(),
        "model_spec": model_spec,
        "data": data,
        "n_train": len(train_names),
        "n_val": len(val_names),
        "train_names": train_names,
        "val_names": val_names,
        "parameters": counts,
        "objective_used": objective_used,
        "epochs_run": epochs_run,
        "stopped_early": history.stopped_early,
        "best_epoch": best_epoch,
        "val_before": pick(before),
        "val_after": pick(best_row),
        "val_last": pick(last_row),
        "val_dq_by_structure_before": before.get("val_dq_by_structure"),
        "val_dq_by_structure_after": best_row.get("val_dq_by_structure"),
        "train_loss_first_epoch": history.row_of(1).get("train_loss"),
        "train_loss_last_epoch": last_row.get("train_loss"),
        "skipped_structures": int(sum(r.get("skipped_structures") or 0 for r in history.rows)),
        "skipped_batches": int(sum(r.get("skipped_batches") or 0 for r in history.rows)),
        "parameter_movement": moved,
        "time_s": round(time_s, 1),
    }
    if step_size is not None:
        out["step_size_before"], out["step_size_after"] = step_size
    b, a = out["val_before"]["dq_mean"], out["val_after"]["dq_mean"]
    if b is not None and a is not None and b > 0:
        out["val_dq_change"] = (a - b) / b
    return out


def jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy/torch scalars to floats, NaN/inf to None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
