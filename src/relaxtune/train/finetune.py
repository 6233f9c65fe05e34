"""The trainer: fine-tune a pretrained potential by backpropagating through relaxations (or, as the baseline,
on the energies and forces of the DFT trajectory frames).

One optimizer step (``objective="structure"``): relax a mini-batch of initial structures together with the
model (``relax_for_training``, gradient mode ``config.grad``), measure Dq of each relaxed structure to its DFT
relaxed counterpart, average over the structures that did not blow up, backpropagate into the model weights
(and the relaxation's ``StepParameters`` when ``learn_step``), clip, step AdamW and the LR schedule.
Structures whose relaxation blew up (non-finite or huge forces) are left out of the loss and counted; a batch
whose gradient is still not finite is retried once without them, and skipped (counted) if that fails too.

Each epoch ends with validation (Dq of FIRE relaxations to ``eval_fmax`` over the validation pairs, as in
``relaxtune evaluate``), a row in ``metrics.csv``, ``best.pt`` when validation Dq improved and ``last.pt``
(which also holds the optimizer, scheduler, RNG and history: ``resume=True`` continues a killed run from it to
the same result, because the data order of each epoch is drawn from a generator seeded by (seed, epoch), not
from global state). Epoch 0 is the pretrained model (the "before" figure). ``summary.json`` holds the before /
after validation metrics and how far each parameter group moved (||θ-θ0|| / ||θ0||, model weights vs
relaxation parameters: the reference paper's "preference" finding). Under Adam every parameter moves about
``lr`` per step whatever its gradient, so that ratio reflects the two learning rates as much as the loss;
``metrics.csv`` therefore also records each group's mean gradient norm (before clipping) per epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml

from relaxtune.data.pairs import dft_frames, frame_stress
from relaxtune.potentials import load_checkpoint_model, load_model
from relaxtune.potentials.base import EnergyModel, energy_and_forces
from relaxtune.potentials.checkpoint import base_model_spec, read_checkpoint
from relaxtune.retention import retention, retention_lines
from relaxtune.state import Batch
from relaxtune.train import checkpoint as ckpt
from relaxtune.train import losses
from relaxtune.train.config import TrainConfig
from relaxtune.train.distill import distillation_draw, distillation_loss, distillation_set
from relaxtune.train.frames import frame_rng, sample_frames
from relaxtune.train.lowrank import add_low_rank, factor_state, has_low_rank, load_factor_state, merged_state_dict

#: CHGNet's module names (children of ``chgnet.model.CHGNet``; our adapter holds it as ``model``).
CHGNET_READOUT = ("mlp", "readout_norm")
CHGNET_EMBEDDINGS = ("atom_embedding", "bond_basis_expansion", "bond_embedding", "bond_weights_ag",
                     "bond_weights_bg", "angle_basis_expansion", "angle_embedding", "composition_model")
#: per-element embeddings (a row or block per element): CHGNet, SevenNet, MACE (``TrainConfig.embedding_lr``)
ELEMENT_EMBEDDINGS = ("atom_embedding", "onehot_to_feature_x", "node_embedding")
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_n", "train_steps_mean", "train_converged_rate",
                 "skipped_structures", "skipped_batches", "cg_iterations", "implicit_fallback", "cg_truncated", "distill_loss",
                 "grad_norm_model", "grad_norm_elements", "grad_norm_relax",
                 "val_dq_mean", "val_dq_median", "val_rmsd_mean", "val_max_disp_mean", "val_basin_match_rate",
                 "val_converged_rate", "val_steps_mean", "step_size", "is_best", "time_s"]


# ---------------------------------------------------------------------------------------------- parameters
def _components(name: str) -> list[str]:
    return name.split(".")


def select_trainable(model: torch.nn.Module, spec: str) -> dict[str, int]:
    """Set ``requires_grad`` by ``spec``: all | readout | freeze-embeddings | comma-separated name fragments.

    readout = CHGNet's ``mlp`` and ``readout_norm`` (other models: the last top-level module with
    parameters); freeze-embeddings = everything but CHGNet's embeddings and basis expansions (atom, bond,
    angle; the AtomRef composition model). Returns {"trainable": n, "frozen": n} parameter counts.
    """
    named = list(model.named_parameters())
    if spec == "all":
        keep = {n for n, _ in named}
    elif spec == "readout":
        keep = {n for n, _ in named if any(c in CHGNET_READOUT for c in _components(n))}
        if not keep:
            tops = [n.split(".")[0] for n, _ in named]
            last = tops[-1] if tops else None
            keep = {n for n, _ in named if n.split(".")[0] == last}
    elif spec in ("freeze-embeddings", "freeze_embeddings"):
        keep = {n for n, _ in named if not any(c in CHGNET_EMBEDDINGS for c in _components(n))}
    else:
        frags = [f.strip() for f in spec.split(",") if f.strip()]
        keep = {n for n, _ in named if any(f in n for f in frags)}
    if not keep:
        raise ValueError(f"train_params {spec!r}: no parameter of the model matches")
    for n, p in named:
        p.requires_grad_(n in keep)
    n_train = sum(p.numel() for n, p in named if n in keep)
    return {"trainable": int(n_train), "frozen": int(sum(p.numel() for _, p in named) - n_train)}


def element_embedding_names(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters that embed each element on its own (``ELEMENT_EMBEDDINGS``)."""
    return {n for n, p in model.named_parameters()
            if p.requires_grad and any(c in ELEMENT_EMBEDDINGS for c in _components(n))}


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in params])


def movement(now: torch.Tensor, start: torch.Tensor) -> dict[str, float]:
    """||θ-θ0||, ||θ0|| and their ratio."""
    diff = float(torch.linalg.vector_norm(now - start)) if now.numel() else 0.0
    base = float(torch.linalg.vector_norm(start)) if start.numel() else 0.0
    return {"relative": diff / base if base > 0 else (0.0 if diff == 0 else math.inf),
            "absolute": diff, "initial_norm": base, "n": int(start.numel())}


def lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then cosine to ``min_lr_ratio`` (or constant)."""
    warm = int(math.ceil(config.warmup_frac * total_steps)) if config.warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------- state
@dataclass
class EpochStats:
    loss_sum: float = 0.0
    n: int = 0
    steps: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    skipped_structures: int = 0
    skipped_batches: int = 0
    cg_iterations: int = 0
    fallback: int = 0
    truncated: int = 0
    grad_norms: dict[str, list[float]] = field(default_factory=dict)
    distill_sum: float = 0.0
    distill_n: int = 0


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def check_cell_pairs(pairs: Sequence, config: TrainConfig) -> None:
    """Training relaxes with the cell fixed. From the DFT-relaxed structure that is the reference's own cell
    (Dq of the positions in it; the stress enters through the DFT frames); from the initial structure of a
    cell relaxation it would compare positions in two different cells, so that is an error."""
    if config.objective == "forces" or config.start != "initial":
        return
    for pair in pairs:
        if getattr(pair, "relax_cell", False):
            raise ValueError(f"structure {pair.name!r}: its reference relaxed the cell, and training relaxes from "
                             "the initial structure with the cell fixed; use --start relaxed (positions at the DFT "
                             "cell, stress from the DFT frames) or --objective forces")


class Trainer:
    """Fine-tunes ``config.model`` on ``train`` pairs, validating on ``val`` pairs, writing into ``out_dir``."""

    def __init__(self, config: TrainConfig, train: Sequence, val: Sequence, out_dir: str | Path, *,
                 model: EnergyModel | None = None, progress: bool = True, log: Callable[[str], None] | None = None):
        if len(train) == 0:
            raise ValueError("no training structures")
        self.config = config
        check_cell_pairs(list(train), config)
        self.train = list(train)
        self.train_species = sorted({s for p in self.train for s in p.initial.get_chemical_symbols()})
        self.val = list(val)
        self.out = Path(out_dir)
        self.progress = progress
        self._log = log
        self.main_process = True  # the process that writes the run's files and checks retention
        self.dtype = _dtype(config.dtype)
        self.model_spec = base_model_spec(config.model)
        if model is None:
            model = load_model(config.model, dtype=self.dtype)
        self.model = model
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.model.eval()  # no dropout / batch statistics: training differentiates the inference model
        self.counts = select_trainable(self.model, config.train_params)
        if config.low_rank:
            self.counts = add_low_rank(self.model, config.low_rank, seed=config.seed)
        self.step_params = None
        if config.learn_step:
            from relaxtune.relax import StepParameters

            self.step_params_kwargs = {"step_size": config.relax_step_size}
            self.step_params = StepParameters(**self.step_params_kwargs).to(self.device)
            if config.grad == "implicit" or config.objective == "forces":
                why = ("the relaxed fixed point does not depend on the step size" if config.objective != "forces"
                       else "the forces objective does not relax")
                self.log(f"note: --learn-step with --grad {config.grad} --objective {config.objective}: {why}, so "
                         "the step size gets no gradient (use --grad full, checkpoint, truncated or hybrid)")
        else:
            self.step_params_kwargs = None
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]
        self.relax_params = list(self.step_params.parameters()) if self.step_params is not None else []
        groups = self._model_groups()
        if self.relax_params:
            groups.append({"params": self.relax_params, "lr": config.step_lr, "weight_decay": 0.0, "name": "relax"})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.batches_per_epoch = int(math.ceil(len(self.train) / config.batch_size))
        self.total_steps = config.epochs * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, self.total_steps))
        self.theta0_model = _flat(self.model_params)
        self.anchor = [p.detach().clone() for p in self.model_params] if config.anchor_weight > 0 else []
        self.distill = (distillation_set(self.model, self.train_species, config.distill_per_prototype, config.seed,
                                         self.dtype) if config.distill_weight > 0 else [])
        self.theta0_relax = _flat(self.relax_params)
        self.module_names = sorted({".".join(n.split(".")[:2]) for n, p in self.model.named_parameters()
                                    if p.requires_grad})
        self.theta0_modules = {m: _flat(self._module_params(m)) for m in self.module_names}
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.bad_epochs = 0
        self.stopped_early = False
        self.started = time.time()
        self.elapsed_before = 0.0
        self.dq_scale: list[float] = []  # per training structure (dq_scale="pretrained")
        self._train_index = {id(p): i for i, p in enumerate(self.train)}
        self.minima: dict[int, np.ndarray] = {}  # training index -> last relaxed positions (warm_start)
        self.cg_solutions: dict[int, np.ndarray] = {}  # training index -> last implicit solution (warm_start)
        self._frames_cache: dict[int, list] = {}
        self._fresh: set[int] = set()  # training indices whose warm starts changed in this step (shared by ranks)
        self._epoch_now = 0  # the epoch being trained (frame draws)
        self.objective_used = self._objective_used()

    def _objective_used(self) -> str:
        """The objective the data allow: a frame objective on data without DFT energies and forces trains on
        what is left (said in the log and summary.json, never silently)."""
        c = self.config
        with_frames = sum(1 for p in self.train if len(self._dft_frames(p)) > 0)
        if c.objective == "structure+forces" and with_frames == 0:
            self.log("note: no training structure carries DFT energies and forces: structure+forces trains on Dq "
                     "alone (objective used: structure)")
            return "structure"
        if c.objective == "forces" and with_frames == 0:
            raise ValueError("objective forces: no training structure carries DFT energies and forces")
        if with_frames < len(self.train) and c.objective != "structure":
            self.log(f"note: {len(self.train) - with_frames} of {len(self.train)} training structures carry no DFT "
                     "energies and forces: their frame term is 0")
        return c.objective

    def _model_groups(self) -> list[dict[str, Any]]:
        """AdamW groups of the model: one, or with ``embedding_lr`` the per-element embeddings apart, so that an
        element's own error can be fixed in its own row at a high rate while the weights every element shares
        move slowly (what moves shared weights moves elements the data never held)."""
        c = self.config
        base = {"weight_decay": c.weight_decay}
        if c.embedding_lr is None:
            return [{"params": self.model_params, "lr": c.lr, "name": "model", **base}]
        names = element_embedding_names(self.model)
        if not names:
            raise ValueError(f"embedding_lr: model {c.model!r} has no trainable per-element embedding "
                             f"({', '.join(ELEMENT_EMBEDDINGS)})")
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n not in names], "lr": c.lr, "name": "model", **base},
                  {"params": [p for n, p in named if n in names], "lr": c.embedding_lr, "name": "elements", **base}]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        elif self.progress:
            from tqdm import tqdm

            tqdm.write(msg)

    def _module_params(self, prefix: str) -> list[torch.Tensor]:
        return [p for n, p in self.model.named_parameters() if p.requires_grad and
                (n == prefix or n.startswith(prefix + "."))]

    def _relax_config(self):
        from relaxtune.relax import RelaxConfig

        c = self.config
        return RelaxConfig(optimizer=c.optimizer, fmax=c.fmax, max_steps=c.steps, blowup_force=c.max_force,
                           **{c.relax_step_field: c.relax_step_size})

    def _implicit_config(self):
        from relaxtune.relax.implicit import ImplicitConfig

        c = self.config
        return ImplicitConfig(cg_tol=c.cg_tol, cg_max_iter=c.cg_max_iter, damping=c.damping)

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(int(self.config.seed) * 100003 + int(epoch))
        return torch.randperm(len(self.train), generator=gen).tolist()

    def _grads_finite(self) -> bool:
        for p in self.model_params + self.relax_params:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return False
        return True

    # ------------------------------------------------------------------ one optimizer step
    def _structure_loss(self, pairs: Sequence, stats: EpochStats) -> tuple[float, int, torch.Tensor]:
        """Relax ``pairs`` with the graph, backward the mean loss. Returns (loss sum, n used, blew-up mask)."""
        from relaxtune.evaluate import start_structures
        from relaxtune.relax.implicit import relax_for_training

        c = self.config
        batch = Batch.from_atoms(self._starts(pairs), dtype=self.dtype, device=self.device)
        reference = torch.tensor(np.concatenate([p.final.get_positions() for p in pairs]), dtype=self.dtype,
                                 device=self.device)
        out = relax_for_training(
            self.model, batch, self._relax_config(), grad_mode=c.grad, step_params=self.step_params,
            truncate_steps=c.truncate_steps, checkpoint_every=c.checkpoint_every, hybrid_steps=c.hybrid_steps,
            head_mode=c.hybrid_head, implicit=self._implicit_config(), cg_guess=self._cg_guess(pairs, batch),
        )
        res = out.result
        weights = losses.StructureLossWeights(dq=c.dq_weight, rmsd=c.rmsd_weight)
        per = losses.structure_loss(res.batch, reference, weights)
        if self.dq_scale:
            scale = [self.dq_scale[self._train_index[id(p)]] if id(p) in self._train_index else 1.0 for p in pairs]
            per = per / torch.tensor(scale, dtype=per.dtype, device=per.device)
        blew = res.blew_up.to(torch.bool) | ~torch.isfinite(per.detach())
        n_ok = int((~blew).sum())
        if n_ok:
            loss = torch.where(blew, torch.zeros_like(per), per).sum() / n_ok
            if loss.requires_grad:
                loss.backward()
        if out.stats is not None:
            self._remember(self.cg_solutions, pairs, batch, out.stats.solution, blew)
            stats.cg_iterations += out.stats.cg_iterations
            stats.fallback += out.stats.fallback
            stats.truncated += out.stats.truncated
        stats.steps.extend(res.n_steps.tolist())
        stats.converged.extend(res.converged.tolist())
        self._remember(self.minima, pairs, res.batch, res.batch.positions, blew)
        loss_sum = float(torch.where(blew, torch.zeros_like(per), per).detach().sum())
        return loss_sum, n_ok, blew

    def _starts(self, pairs: Sequence) -> list:
        """Where each pair's training relaxation begins: ``config.start``, or with ``warm_start`` (from the
        DFT-relaxed structure only) the minimum the previous epoch's relaxation of the same structure reached:
        the model moves little per epoch, so its new minimum lies a few steps away."""
        from relaxtune.evaluate import start_structures

        starts = start_structures(pairs, self.config.start)
        if not (self.config.warm_start and self.config.start == "relaxed"):
            return starts
        out = []
        for pair, atoms in zip(pairs, starts):
            previous = self.minima.get(self._train_index.get(id(pair), -1))
            if previous is not None and previous.shape == atoms.positions.shape:
                atoms = atoms.copy()
                atoms.positions = previous
            out.append(atoms)
        return out

    def _remember(self, store: dict[int, np.ndarray], pairs: Sequence, batch: Batch, values: torch.Tensor | None,
                  blew: torch.Tensor) -> None:
        """Keep each training structure's rows of ``values`` (where finite) for its next epoch: relaxed
        positions (the warm start) or the implicit solve's solution (the next solve's guess)."""
        if values is None or not self.config.warm_start:
            return
        values = values.detach().cpu().double().numpy()
        for pair, sl, bad in zip(pairs, batch.system_slices(), blew.tolist()):
            index = self._train_index.get(id(pair))
            if index is not None and not bad and np.isfinite(values[sl]).all():
                store[index] = values[sl].copy()
                self._fresh.add(index)

    def _cg_guess(self, pairs: Sequence, batch: Batch) -> torch.Tensor | None:
        """The previous epoch's implicit solutions of these structures as the CG starting point (zeros where
        there is none), or None when there is none at all."""
        if not self.config.warm_start or self.config.grad not in ("implicit", "hybrid"):
            return None
        rows = [self.cg_solutions.get(self._train_index.get(id(p), -1)) for p in pairs]
        if all(r is None for r in rows):
            return None
        guess = torch.zeros_like(batch.positions)
        for row, sl in zip(rows, batch.system_slices()):
            if row is not None and row.shape == tuple(guess[sl].shape):
                guess[sl] = torch.as_tensor(row, dtype=guess.dtype)
        return guess

    def _dft_frames(self, pair) -> list:
        key = id(pair)
        if key not in self._frames_cache:
            self._frames_cache[key] = dft_frames(pair)
        return self._frames_cache[key]

    def _frame_chunks(self, pairs: Sequence, sample: bool = False) -> list[tuple[int, Any, list, list[float], bool]]:
        """(structure index, its relaxed DFT frame, up to ``frame_chunk`` DFT frames, each frame's weight in its
        structure's mean, whether their stress counts) over ``pairs``: every frame at weight 1/n, or with
        ``sample`` the ``frames_per_structure`` frames of this epoch's draw (``sample_frames``). The stress
        counts on a cell relaxation always, on a fixed-cell one with ``fixed_cell_stress``."""
        c = self.config
        chunks = []
        for k, pair in enumerate(pairs):
            frames = self._dft_frames(pair)
            index = self._train_index.get(id(pair), k)
            picks = sample_frames(len(frames), c.frames_per_structure if sample else 0,
                                  frame_rng(c.seed, self._epoch_now, index))
            use_stress = bool(getattr(pair, "relax_cell", False)) or c.fixed_cell_stress
            for i in range(0, len(picks), c.frame_chunk):
                chunk = picks[i:i + c.frame_chunk]
                chunks.append((k, frames[-1], [frames[j] for j, _ in chunk], [w for _, w in chunk], use_stress))
        return chunks

    def _frame_terms(self, ref, frames: list, use_stress: bool = True) -> torch.Tensor:
        """Energy/force(/stress) loss of each DFT frame (len(frames),), with the graph: MSE of the forces,
        squared error of the energy relative to the relaxed frame ``ref`` (per atom, or in total eV with
        ``energy_scale="total"``), and, on frames that carry a DFT stress (every frame of a cell relaxation; the
        relaxed frame of a fixed-cell one where it was computed), ``stress_weight`` x the MSE of the stress in
        GPa."""
        c = self.config
        extra = [a for a in frames if a is not ref]  # the relaxed frame among ``frames`` reuses row 0
        rows = [0 if a is ref else 1 + extra.index(a) for a in frames]
        structures = [ref] + extra
        stresses = [frame_stress(a) if use_stress else None for a in structures]
        with_stress = c.stress_weight > 0 and any(st is not None for st in stresses)
        batch = Batch.from_atoms(structures, dtype=self.dtype, device=self.device)
        ef = energy_and_forces(self.model, batch, self.model.prepare(batch), create_graph=True,
                               compute_stress=with_stress)
        e_dft = torch.tensor([a.get_potential_energy() for a in structures], dtype=self.dtype, device=self.device)
        f_dft = torch.tensor(np.concatenate([a.get_forces() for a in structures]), dtype=self.dtype,
                             device=self.device)
        e_term = ((ef.energy - ef.energy[0]) - (e_dft - e_dft[0])) ** 2
        if c.energy_scale == "per-atom":
            e_term = e_term / float(len(ref)) ** 2
        f_per = losses.force_loss(ef.forces, f_dft, batch.system_idx, batch.n_systems, batch.fixed)
        terms = c.energy_weight * e_term + c.force_weight * f_per
        if with_stress:
            has = torch.tensor([st is not None for st in stresses], device=self.device)
            s_dft = torch.tensor(np.stack([np.zeros((3, 3)) if st is None else st for st in stresses]),
                                 dtype=self.dtype, device=self.device)
            s_term = losses.stress_loss(ef.stress, s_dft)
            terms = terms + c.stress_weight * torch.where(has, s_term, torch.zeros_like(s_term))
        return terms[torch.tensor(rows, dtype=torch.long, device=terms.device)]

    def _forces_loss(self, pairs: Sequence, stats: EpochStats) -> tuple[float, int, torch.Tensor]:
        """Baseline: MSE of forces and relative energies over every DFT frame of ``pairs`` (chunks, grad
        accumulation). Returns (mean loss per structure summed, n structures, blew-up mask (none))."""
        chunks = self._frame_chunks(pairs)
        n_frames = sum(len(ch[2]) for ch in chunks)
        if n_frames == 0:
            return 0.0, 0, torch.zeros(len(pairs), dtype=torch.bool)
        total = 0.0
        for _, ref, frames, _, use_stress in chunks:
            loss = self._frame_terms(ref, frames, use_stress).sum()
            if loss.requires_grad:
                (loss / n_frames).backward()  # the mean over the batch's frames
            total += float(loss.detach())
        return total / n_frames * len(pairs), len(pairs), torch.zeros(len(pairs), dtype=torch.bool)

    def _combined_loss(self, pairs: Sequence, stats: EpochStats) -> tuple[float, int, torch.Tensor]:
        """Dq through the relaxation plus ``forces_mix`` x each structure's mean energy/force loss over its DFT
        frames (estimated from ``frames_per_structure`` of them per step), averaged over the structures whose
        relaxation did not blow up. The frames anchor the
        potential energy surface along the whole DFT path (most atoms of a defect cell are bulk-like), which the
        relaxed end point alone constrains weakly."""
        loss_sum, n_ok, blew = self._structure_loss(pairs, stats)
        kept = [p for p, b in zip(pairs, blew.tolist()) if not b]
        if not n_ok:
            return loss_sum, n_ok, blew
        mix = self.config.forces_mix
        for _, ref, frames, weights, use_stress in self._frame_chunks(kept, sample=True):
            terms = self._frame_terms(ref, frames, use_stress)
            loss = (terms * torch.tensor(weights, dtype=terms.dtype, device=terms.device)).sum()
            if loss.requires_grad:
                (loss * mix / n_ok).backward()
            loss_sum += mix * float(loss.detach())
        return loss_sum, n_ok, blew

    def _loss_fn(self) -> Callable[[Sequence, EpochStats], tuple[float, int, torch.Tensor]]:
        return {"structure": self._structure_loss, "forces": self._forces_loss,
                "structure+forces": self._combined_loss}[self.config.objective]

    def _keep_pretrained(self, stats: EpochStats) -> None:
        """Add the gradients of the terms that keep the model near its pretrained self: self-distillation on
        this step's draw of the bulk set and the L2-SP anchor. Each rank adds the same (the draw depends on the
        seed and the step alone), after the data gradient is complete."""
        c = self.config
        if self.distill and c.distill_weight > 0:
            picks = distillation_draw(len(self.distill), c.distill_per_step, c.seed, self.scheduler.last_epoch)
            loss = distillation_loss(self.model, [self.distill[i] for i in picks], c.stress_weight, self.dtype)
            grads = torch.autograd.grad(c.distill_weight * loss, self.model_params, allow_unused=True)
            if c.distill_project:
                self._drop_conflict(grads)
            for p, g in zip(self.model_params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            stats.distill_sum += float(loss.detach())
            stats.distill_n += 1
        for p, p0 in zip(self.model_params, self.anchor):
            g = 2.0 * c.anchor_weight * (p.detach() - p0)
            p.grad = g if p.grad is None else p.grad + g

    def _drop_conflict(self, keep: Sequence[torch.Tensor | None]) -> None:
        """Gradient surgery (PCGrad): where the data gradient points against ``keep`` (the distillation
        gradient), remove that component from it, so that the data step leaves the kept loss unchanged to first
        order. Every rank holds the same gradients here, so every rank makes the same change."""
        pairs = [(p, g) for p, g in zip(self.model_params, keep) if g is not None and p.grad is not None]
        if not pairs:
            return
        dot = sum(float((p.grad.double() * g.double()).sum()) for p, g in pairs)
        norm2 = sum(float((g.double() ** 2).sum()) for _, g in pairs)
        if dot < 0 and norm2 > 0:
            for p, g in pairs:
                p.grad = p.grad - (dot / norm2) * g

    def _step(self, pairs: Sequence, stats: EpochStats) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        fn = self._loss_fn()
        try:
            loss_sum, n_ok, blew = fn(pairs, stats)
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            # a relaxation that went so wrong that the model or the neighbour search raised (e.g. NaN
            # coordinates): skip this batch, count it, keep training
            self.log(f"skipped a batch ({', '.join(p.name for p in pairs)}): {type(exc).__name__}: "
                     f"{' '.join(str(exc).split())[:200]}")
            self.optimizer.zero_grad(set_to_none=True)
            stats.skipped_batches += 1
            stats.skipped_structures += len(pairs)
            self.scheduler.step()
            return
        stats.skipped_structures += int(blew.sum())
        if n_ok and not self._grads_finite() and bool(blew.any()):
            # NaNs of a blown-up structure can leak into the shared gradient (0 * inf): retry without it
            self.optimizer.zero_grad(set_to_none=True)
            kept = [p for p, b in zip(pairs, blew.tolist()) if not b]
            loss_sum, n_ok, blew2 = fn(kept, EpochStats())
            stats.skipped_structures += int(blew2.sum())
        if n_ok == 0 or not self._grads_finite():
            self.optimizer.zero_grad(set_to_none=True)
            stats.skipped_batches += 1
            self.scheduler.step()  # keep the schedule aligned with the planned number of steps
            return
        self._update(stats, loss_sum, n_ok)

    def _update(self, stats: EpochStats, loss_sum: float, n_ok: int) -> None:
        """The end of every optimizer step, one process or many (the data gradient complete on every rank): the
        terms that keep the pretrained model, gradient norms per group (metrics.csv), clipping, AdamW."""
        self._keep_pretrained(stats)
        for p in self.model_params + self.relax_params:  # unreached this step: a zero gradient, as on many ranks
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for group in self.optimizer.param_groups:  # norms before clipping (diagnostics in metrics.csv)
            grads = [p.grad.detach().double().reshape(-1) for p in group["params"] if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0
            stats.grad_norms.setdefault(group.get("name", "model"), []).append(norm)
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(group["params"], self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        stats.loss_sum += loss_sum
        stats.n += n_ok

    # ------------------------------------------------------------------ validation, checkpoints
    def _eval_kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(fmax=c.eval_fmax, optimizer=c.eval_optimizer, max_steps=c.eval_max_steps,
                    batch_size=c.batch_size, dtype=self.dtype, start=c.val_start)

    def _evaluate(self, pairs: Sequence, **kwargs: Any):
        """Relax ``pairs`` without a graph (``relaxtune.evaluate.evaluate``; all ranks share it when distributed)."""
        from relaxtune.evaluate import evaluate

        return evaluate(self.model, pairs, **kwargs)

    def validate(self) -> dict[str, Any] | None:
        if not self.val:
            return None
        result = self._evaluate(self.val, **self._eval_kwargs())
        metrics = dict(result.metrics)
        metrics["dq_by_structure"] = {r["name"]: r["dq"] for r in result.rows}
        return metrics

    def _measure_dq_scale(self) -> list[float]:
        """Pretrained Dq of every training structure from the training start (``dq_scale="pretrained"``),
        floored at ``dq_scale_floor``, in training order; [] for absolute losses and the forces objective."""
        c = self.config
        if c.dq_scale != "pretrained" or c.objective == "forces":
            return []
        rows = self._evaluate(self.train, fmax=c.fmax, optimizer=c.optimizer, max_steps=c.steps,
                              batch_size=c.batch_size, dtype=self.dtype, start=c.start).rows
        # a pretrained relaxation that blew up (NaN) gets weight 1: no information on its scale
        return [max(float(r["dq"]), c.dq_scale_floor) if math.isfinite(float(r["dq"])) else 1.0 for r in rows]

    def _payload(self, metrics: dict[str, Any] | None, with_trainer: bool) -> dict[str, Any]:
        data = {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "model_spec": self.model_spec,
            "model_name": getattr(self.model, "name", "model"),
            "dtype": self.config.dtype,
            "state_dict": merged_state_dict(self.model),
            "step_params": self.step_params.state_dict() if self.step_params is not None else None,
            "step_params_kwargs": self.step_params_kwargs,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "metrics": _jsonable(metrics) if metrics else {},
            "train_species": self.train_species,
        }
        if with_trainer:
            data["trainer"] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.rng_state(),
                "low_rank": factor_state(self.model),
                "history": json.dumps(_jsonable(self.history)),
                "best": json.dumps(_jsonable(self.best)),
                "bad_epochs": self.bad_epochs,
                "stopped_early": self.stopped_early,
                "theta0_model": self.theta0_model,
                "theta0_relax": self.theta0_relax,
                "theta0_modules": self.theta0_modules,
                "elapsed": self.elapsed_before + (time.time() - self.started),
                "dq_scale": self.dq_scale,
                "minima": {str(i): torch.from_numpy(pos) for i, pos in self.minima.items()},
                "cg_solutions": {str(i): torch.from_numpy(v) for i, v in self.cg_solutions.items()},
            }
        return data

    def _write_metrics(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
        ckpt.atomic_write_text(buf.getvalue(), self.out / "metrics.csv")

    def _restore(self, path: Path) -> None:
        data = read_checkpoint(path)
        if "trainer" not in data:
            raise ValueError(f"{path}: has no trainer state (resume needs last.pt)")
        if has_low_rank(self.model):  # the base weights are pretrained and fixed: only the factors were trained
            load_factor_state(self.model, data["trainer"].get("low_rank") or {})
        else:
            self.model.load_state_dict(data["state_dict"])
        if self.step_params is not None and data.get("step_params") is not None:
            self.step_params.load_state_dict(data["step_params"])
        tr = data["trainer"]
        self.optimizer.load_state_dict(tr["optimizer"])
        self.scheduler.load_state_dict(tr["scheduler"])
        ckpt.set_rng_state(tr["rng"])
        self.history = json.loads(tr["history"])
        self.best = json.loads(tr["best"])
        self.bad_epochs = int(tr["bad_epochs"])
        self.stopped_early = bool(tr["stopped_early"])
        self.theta0_model = tr["theta0_model"]
        self.theta0_relax = tr["theta0_relax"]
        self.theta0_modules = dict(tr["theta0_modules"])
        self.elapsed_before = float(tr.get("elapsed", 0.0))
        self.dq_scale = [float(v) for v in tr.get("dq_scale") or []]
        self.minima = {int(i): pos.numpy() for i, pos in (tr.get("minima") or {}).items()}
        self.cg_solutions = {int(i): v.numpy() for i, v in (tr.get("cg_solutions") or {}).items()}
        self.epoch = int(data["epoch"])

    # ------------------------------------------------------------------ the run
    def _record(self, epoch: int, stats: EpochStats | None, val: dict | None, seconds: float) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "time_s": round(seconds, 3)}
        if stats is not None:
            row.update({
                "train_loss": stats.loss_sum / stats.n if stats.n else None, "train_n": stats.n,
                "train_steps_mean": float(np.mean(stats.steps)) if stats.steps else None,
                "train_converged_rate": float(np.mean(stats.converged)) if stats.converged else None,
                "skipped_structures": stats.skipped_structures, "skipped_batches": stats.skipped_batches,
                "cg_iterations": stats.cg_iterations, "implicit_fallback": stats.fallback,
                "cg_truncated": stats.truncated,
                "distill_loss": stats.distill_sum / stats.distill_n if stats.distill_n else None,
            })
            for name, norms in stats.grad_norms.items():
                row[f"grad_norm_{name}"] = float(np.mean(norms)) if norms else None
        if val is not None:
            for key in ("dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate",
                        "converged_rate", "steps_mean"):
                row[f"val_{key}"] = val.get(key)
            if "dq_by_structure" in val:  # summary.json only (not a metrics.csv column)
                row["val_dq_by_structure"] = val["dq_by_structure"]
        if self.step_params is not None:
            row["step_size"] = float(self.step_params.step_size.detach())
        # best: lowest validation Dq (or training loss without a validation set)
        score = row.get("val_dq_mean") if self.val else row.get("train_loss")
        improved = False
        if score is not None and math.isfinite(score):
            best_score = self.best.get("score") if self.best else None
            best_score = math.inf if best_score is None else best_score
            # an improvement at round-off level (a learning rate too small to matter) is not one
            tolerance = max(self.config.min_delta, 1e-9 * abs(best_score) if math.isfinite(best_score) else 0.0)
            if score < best_score - tolerance:
                improved = True
        if epoch == 0 and not self.val:
            improved = self.best is None  # the pretrained model is the first "best" without validation
            score = math.inf if score is None else score
        row["is_best"] = improved
        if improved:
            self.best = {"epoch": epoch, "score": score, "val": val, "train_loss": row.get("train_loss")}
            self.bad_epochs = 0
        elif epoch > 0:
            self.bad_epochs += 1
        self.history.append(row)
        return row

    def _save(self, row: dict[str, Any], val: dict | None) -> None:
        if row["is_best"]:
            ckpt.atomic_save(self._payload(val, with_trainer=False), self.out / "best.pt")
        ckpt.atomic_save(self._payload(val, with_trainer=True), self.out / "last.pt")
        self._write_metrics()

    def run(self, resume: bool = False, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train (or continue from ``out_dir/last.pt`` with ``resume``); returns the summary dict.
        ``stop_after_epoch`` ends the run after that epoch's checkpoint, as a kill would (tests)."""
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(c.seed)
        np.random.seed(c.seed % (2**32))
        last = self.out / "last.pt"
        if resume and last.exists():
            self._restore(last)
            self.log(f"resumed from {last} at epoch {self.epoch}")
        else:
            if self.main_process:  # the resolved settings, reusable as ``relaxtune finetune --config``
                ckpt.atomic_write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), self.out / "config.yaml")
            t0 = time.time()
            self.dq_scale = self._measure_dq_scale()
            val = self.validate()
            row = self._record(0, None, val, time.time() - t0)
            self._save(row, val)
            self.log(self._line(row))
        while self.epoch < c.epochs and not self.stopped_early:
            if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                return {}
            epoch = self.epoch + 1
            self._epoch_now = epoch
            t0 = time.time()
            stats = EpochStats()
            order = self._epoch_order(epoch)
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=len(order), desc=f"epoch {epoch}/{c.epochs}", unit="structure", leave=False)
            for b in range(self.batches_per_epoch):
                idx = order[b * c.batch_size:(b + 1) * c.batch_size]
                self._step([self.train[i] for i in idx], stats)
                if bar is not None:
                    bar.update(len(idx))
                    if stats.n:
                        bar.set_postfix(loss=f"{stats.loss_sum / stats.n:.4f}")
            if bar is not None:
                bar.close()
            val = self.validate()
            self.epoch = epoch
            row = self._record(epoch, stats, val, time.time() - t0)
            if c.patience > 0 and self.bad_epochs >= c.patience:
                self.stopped_early = True
            self._save(row, val)
            self.log(self._line(row))
        summary = self.summary()
        if c.retention_check and self.main_process:
            summary["retention"] = self.check_retention()
        self._write_summary(summary)
        return summary

    def check_retention(self) -> dict[str, Any]:
        """best.pt against the pretrained model on what neither trained on (``relaxtune.retention``): the crystals
        of the training elements and the validation structures' DFT frames; logged item by item."""
        self.log(f"checking retention: best.pt against {self.config.model} on the bulk crystals of "
                 f"{', '.join(self.train_species)} (about a minute for CHGNet on 2 cores; --no-retention skips it)")
        best = load_checkpoint_model(self.out / "best.pt", dtype=self.dtype).to(self.device)
        pretrained = load_model(self.config.model, dtype=self.dtype).to(self.device)
        frames = {"validation": [f for p in self.val for f in self._dft_frames(p)]}
        result = retention(best, pretrained, self.train_species, extra_frames=frames)
        for line in retention_lines(result):
            self.log(line)
        return result

    def _write_summary(self, summary: dict[str, Any]) -> None:
        ckpt.atomic_write_text(json.dumps(_jsonable(summary), indent=2) + "\n", self.out / "summary.json")

    def _line(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}"]
        if row.get("train_loss") is not None:
            label = {"structure": "train Dq", "forces": "train E/F loss"}.get(self.config.objective, "train loss")
            if self.dq_scale and self.config.objective == "structure":
                label = "train Dq/pretrained"  # the relative loss: 1 = as far from DFT as the pretrained model
            parts.append(f"{label} {row['train_loss']:.4f}")
        if row.get("val_dq_mean") is not None:
            label = "val Dq" if self.config.val_start == "initial" else "val Dq (from relaxed)"
            parts.append(f"{label} {row['val_dq_mean']:.4f}")
        if row.get("skipped_structures"):
            parts.append(f"skipped {row['skipped_structures']}")
        parts.append(self._pace(row))
        if row.get("is_best"):
            parts.append("*")
        return "  ".join(parts)

    def _pace(self, row: dict[str, Any]) -> str:
        """Elapsed wall time, structures/s of the epoch and the time left at the mean epoch time so far."""
        elapsed = self.elapsed_before + (time.time() - self.started)
        text = f"[{_clock(elapsed)}"
        epochs = [r["time_s"] for r in self.history if r["epoch"] > 0]
        if row["epoch"] > 0 and row.get("time_s"):
            left = (self.config.epochs - row["epoch"]) * (sum(epochs) / len(epochs)) if epochs else 0.0
            text += f", {len(self.train) / row['time_s']:.2f} structures/s, ~{_clock(left)} left"
        return text + "]"

    def summary(self) -> dict[str, Any]:
        before = self.history[0] if self.history else {}
        best_epoch = self.best["epoch"] if self.best else None
        best_row = next((r for r in self.history if r["epoch"] == best_epoch), {})
        last_row = self.history[-1] if self.history else {}
        moved = {"model": movement(_flat(self.model_params), self.theta0_model)}
        if self.relax_params:
            moved["relax"] = movement(_flat(self.relax_params), self.theta0_relax)
        moved["model_by_module"] = {
            m: movement(_flat(self._module_params(m)), self.theta0_modules[m])["relative"] for m in self.module_names
            if m in self.theta0_modules
        }
        keys = ("dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate", "converged_rate",
                "steps_mean")
        def pick(row):
            return {k: row.get(f"val_{k}") for k in keys}

        out = {
            "config": self.config.to_dict(),
            "model_spec": self.model_spec,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "train_names": [p.name for p in self.train],
            "val_names": [p.name for p in self.val],
            "parameters": self.counts,
            "objective_used": self.objective_used,
            "epochs_run": self.epoch,
            "stopped_early": self.stopped_early,
            "best_epoch": best_epoch,
            "val_before": pick(before),
            "val_after": pick(best_row),
            "val_last": pick(last_row),
            "val_dq_by_structure_before": before.get("val_dq_by_structure"),
            "val_dq_by_structure_after": best_row.get("val_dq_by_structure"),
            "train_loss_first_epoch": next((r.get("train_loss") for r in self.history if r["epoch"] == 1), None),
            "train_loss_last_epoch": last_row.get("train_loss"),
            "skipped_structures": int(sum(r.get("skipped_structures") or 0 for r in self.history)),
            "skipped_batches": int(sum(r.get("skipped_batches") or 0 for r in self.history)),
            "parameter_movement": moved,
            "time_s": round(self.elapsed_before + (time.time() - self.started), 1),
        }
        if self.step_params is not None:
            out["step_size_before"] = float(self.step_params_kwargs["step_size"])
            out["step_size_after"] = float(self.step_params.step_size.detach())
        b, a = out["val_before"]["dq_mean"], out["val_after"]["dq_mean"]
        if b is not None and a is not None and b > 0:
            out["val_dq_change"] = (a - b) / b
        return out


def _clock(seconds: float) -> str:
    """Wall time as m:ss (h:mm:ss past an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _jsonable(obj):
    """Plain JSON types (numpy/torch scalars to floats, NaN/inf to None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def finetune(config: TrainConfig, train: Sequence, val: Sequence, out_dir: str | Path, *, resume: bool = False,
             model: EnergyModel | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a fine-tuning (see the module docstring); returns the summary written to ``out_dir/summary.json``.

    With ``resume`` and an existing ``out_dir/last.pt`` the stored config is used (``epochs`` and
    ``patience`` may be raised to train longer).
    """
    out = Path(out_dir)
    if resume and (out / "last.pt").exists():
        stored = TrainConfig.from_dict(read_checkpoint(out / "last.pt")["config"])
        config = stored.replace(epochs=max(stored.epochs, config.epochs), patience=config.patience)
    trainer = Trainer(config, train, val, out, model=model, progress=progress, log=log)
    return trainer.run(resume=resume)
