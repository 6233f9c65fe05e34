"""Low-rank updates (LoRA-style): train W0 + (α/r)·B·A on each linear layer instead of W0 itself.

The base weights stay fixed, so what fine-tuning can change is limited to a rank-r correction of each linear map
(B starts at zero: the model starts exactly pretrained). Implemented with ``torch.nn.utils.parametrize``, so the
model's own forward code is untouched. A checkpoint stores the merged weights under the base model's names
(any relaxtune reader loads it as a plain fine-tuned model) and, for resuming, the factors A and B.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import parametrize


class LowRankDelta(torch.nn.Module):
    """The parametrization W ↦ W + (alpha / rank)·B·A of one weight matrix of shape (out, in)."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator):
        super().__init__()
        n_out, n_in = shape
        a = torch.randn(rank, n_in, generator=generator, dtype=torch.float64) / math.sqrt(n_in)
        self.A = torch.nn.Parameter(a.to(dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(n_out, rank, dtype=dtype, device=device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


def add_low_rank(model: torch.nn.Module, rank: int, seed: int = 0, alpha: float | None = None) -> dict[str, int]:
    """Give every ``nn.Linear`` whose weight is trainable (after ``select_trainable``) a rank-``rank`` update;
    freeze every other parameter. Returns {"trainable": n, "frozen": n} parameter counts."""
    if rank < 1:
        raise ValueError(f"low_rank: rank must be >= 1 (got {rank})")
    generator = torch.Generator().manual_seed(seed)
    targets = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad
               and min(m.weight.shape) > rank]
    if not targets:
        raise ValueError(f"low_rank {rank}: the model has no trainable linear layer wider than the rank")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in targets:
        w = module.weight
        delta = LowRankDelta(w.shape, rank, float(alpha or rank), w.dtype, w.device, generator)
        parametrize.register_parametrization(module, "weight", delta)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if not _is_factor(n))
    return {"trainable": int(trainable), "frozen": int(total)}


def _is_factor(name: str) -> bool:
    return ".parametrizations.weight.0." in name


def has_low_rank(model: torch.nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with each low-rank update added in, under the base model's parameter names."""
    state = model.state_dict()
    with torch.no_grad():
        for name, module in model.named_modules():
            if parametrize.is_parametrized(module, "weight"):
                prefix = f"{name}." if name else ""
                for key in [k for k in state if k.startswith(f"{prefix}parametrizations.weight.")]:
                    del state[key]
                state[f"{prefix}weight"] = module.weight.detach().clone()
    return state


def factor_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The factors A and B of every low-rank update, by parameter name (what a resume needs)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if _is_factor(n)}


def load_factor_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set the factors from ``factor_state`` output (the base weights are the pretrained ones, unchanged)."""
    named = dict(model.named_parameters())
    missing = sorted(n for n in named if _is_factor(n) and n not in state)
    if missing:
        raise ValueError(f"checkpoint lacks the low-rank factors {missing[:3]}...")
    with torch.no_grad():
        for n, value in state.items():
            named[n].copy_(value)
