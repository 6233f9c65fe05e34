"""Warm starts (``warm_start``): each training structure's relaxation and implicit CG solve begin where the
previous epoch's ended. The model moves little per epoch, so its new minimum lies a few steps away and the new
solution near the old one."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from relaxtune.state import Batch
from relaxtune.train.config import TrainConfig


class WarmStarts:
    """Last relaxed positions (``minima``) and implicit solutions (``cg_solutions``) by training index."""

    def __init__(self, config: TrainConfig, train_index: dict[int, int]):
        self.config = config
        self.train_index = train_index  # id(pair) -> training index
        self.minima: dict[int, np.ndarray] = {}
        self.cg_solutions: dict[int, np.ndarray] = {}
        self._fresh: set[int] = set()  # indices changed since ``take_fresh`` (what ranks exchange)

    def starts(self, pairs: Sequence, structures: list) -> list:
        """``structures`` (the pairs' start structures), with ``warm_start`` from the DFT-relaxed structure
        moved to the minimum of the previous relaxation of the same structure."""
        if not (self.config.warm_start and self.config.start == "relaxed"):
            return structures
        out = []
        for pair, atoms in zip(pairs, structures):
            previous = self.minima.get(self.train_index.get(id(pair), -1))
            if previous is not None and previous.shape == atoms.positions.shape:
                atoms = atoms.copy()
                atoms.positions = previous
            out.append(atoms)
        return out

    def cg_guess(self, pairs: Sequence, batch: Batch) -> torch.Tensor | None:
        """The previous implicit solutions of these structures as the CG starting point (zeros where there is
        none), or None when there is none at all."""
        if not self.config.warm_start or self.config.grad not in ("implicit", "hybrid"):
            return None
        rows = [self.cg_solutions.get(self.train_index.get(id(p), -1)) for p in pairs]
        if all(r is None for r in rows):
            return None
        guess = torch.zeros_like(batch.positions)
        for row, sl in zip(rows, batch.system_slices()):
            if row is not None and row.shape == tuple(guess[sl].shape):
                guess[sl] = torch.as_tensor(row, dtype=guess.dtype)
        return guess

    def remember_minima(self, pairs: Sequence, batch: Batch, blew: torch.Tensor) -> None:
        """Keep each structure's relaxed positions (``batch.positions``) for its next relaxation."""
        self._remember(self.minima, pairs, batch, batch.positions, blew)

    def remember_solutions(self, pairs: Sequence, batch: Batch, solution: torch.Tensor | None,
                           blew: torch.Tensor) -> None:
        """Keep each structure's implicit solution for its next CG solve."""
        self._remember(self.cg_solutions, pairs, batch, solution, blew)

    def _remember(self, store: dict[int, np.ndarray], pairs: Sequence, batch: Batch, values: torch.Tensor | None,
                  blew: torch.Tensor) -> None:
        if values is None or not self.config.warm_start:
            return
        values = values.detach().cpu().double().numpy()
        for pair, sl, bad in zip(pairs, batch.system_slices(), blew.tolist()):
            index = self.train_index.get(id(pair))
            if index is not None and not bad and np.isfinite(values[sl]).all():
                store[index] = values[sl].copy()
                self._fresh.add(index)

    def take_fresh(self) -> dict[int, tuple[np.ndarray | None, np.ndarray | None]]:
        """(positions, solution) of every structure whose warm start changed since the last call."""
        fresh = {i: (self.minima.get(i), self.cg_solutions.get(i)) for i in self._fresh}
        self._fresh.clear()
        return fresh

    def merge(self, fresh: dict[int, tuple[np.ndarray | None, np.ndarray | None]]) -> None:
        """Take another rank's ``take_fresh``: next epoch any rank may relax those structures."""
        for i, (positions, solution) in fresh.items():
            if positions is not None:
                self.minima[i] = positions
            if solution is not None:
                self.cg_solutions[i] = solution

    def state(self) -> dict[str, Any]:
        """For last.pt: tensors keyed by the training index as a string."""
        return {"minima": {str(i): torch.from_numpy(pos) for i, pos in self.minima.items()},
                "cg_solutions": {str(i): torch.from_numpy(v) for i, v in self.cg_solutions.items()}}

    def load(self, state: dict[str, Any]) -> None:
        self.minima = {int(i): pos.numpy() for i, pos in (state.get("minima") or {}).items()}
        self.cg_solutions = {int(i): v.numpy() for i, v in (state.get("cg_solutions") or {}).items()}
