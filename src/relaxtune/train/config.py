"""Every setting of a fine-tuning run, in one serialisable dataclass (stored in checkpoints and summary.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from relaxtune.evaluate import STARTS
from relaxtune.relax import OPTIMIZERS, RelaxConfig
from relaxtune.relax.implicit import GRAD_MODES

OBJECTIVES = ("structure", "forces", "structure+forces")
DQ_SCALES = ("absolute", "pretrained")
ENERGY_SCALES = ("per-atom", "total")
#: (energy_scale, energy_weight) when left unset: the conventional baseline fits energies per atom with weight 1
#: (CHGNet's own fine-tuning); the structure objectives fit them in total eV with weight 0.1 (docs/results.md)
ENERGY_DEFAULTS = {"forces": ("per-atom", 1.0), "structure": ("total", 0.1), "structure+forces": ("total", 0.1)}
#: the behaviour of runs made before these fields existed (see ``TrainConfig.from_dict``)
BEFORE_FIELD_EXISTED = {"start": "initial", "val_start": "initial", "dq_scale": "absolute", "energy_scale": "per-atom",
                        "frames_per_structure": 0, "warm_start": False, "distill_weight": 0.0, "anchor_weight": 0.0,
                        "distill_orthogonal": False,
                        "retention_check": False, "distill_project": False,
                        "low_rank": 0, "distill_force_weight": 1.0, "average_epochs": 0.0}
TRAIN_PARAMS = ("all", "readout", "freeze-embeddings")
SCHEDULES = ("cosine", "constant")
HYBRID_HEADS = ("checkpoint", "full")
#: the training relaxation's optimizer: "auto" is L-BFGS where the relaxation needs no graph (``grad="implicit"``),
#: else FIRE
TRAIN_OPTIMIZERS = ("auto",) + OPTIMIZERS
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a fine-tuning run; the defaults are the default recipe (docs/results.md, "Methods").

    Objective (``objective``): ``structure+forces`` (default) is Dq of the model's relaxed structure to DFT's
    plus ``forces_mix`` times each structure's mean energy/force loss over its DFT frames; ``structure`` is Dq
    alone (the reference method's loss); ``forces`` is the conventional baseline, the energy/force(/stress) MSE
    on every DFT frame, ``batch_size`` structures per optimizer step so that both take the same number of steps.
    The frame loss: ``force_weight`` x force MSE, ``energy_weight`` x the squared error of each frame's energy
    relative to the relaxed frame (``energy_scale``: "total" eV, the differences between a defect's
    configurations, or "per-atom", CHGNet's convention; unset, both follow ``ENERGY_DEFAULTS``), and
    ``stress_weight`` x the stress MSE in GPa on frames that carry a DFT stress (cell relaxations; fixed-cell
    frames only with ``fixed_cell_stress``). Each step estimates a structure's mean frame loss from
    ``frames_per_structure`` frames (the relaxed one and one per stratum of the path, weighted to be unbiased:
    ``relaxtune.train.frames``; 0 = every frame), ``frame_chunk`` frames per model call.
    ``dq_scale="pretrained"`` divides each structure's Dq by the pretrained model's (measured before the first
    epoch, floored at ``dq_scale_floor``), so that every structure pulls alike; "absolute" is the plain mean.

    Training relaxation: ``optimizer`` ("auto": "lbfgs" with ``grad="implicit"``, else "fire"; "fire" | "gd" |
    "lbfgs", the last with ``grad="implicit"`` only) for at most ``steps`` steps to ``fmax``, from ``start``: "relaxed" (the DFT-relaxed structure: the model slides into
    its own nearest minimum) or "initial" (the reference method: the loss also sees which basin it reaches).
    ``warm_start`` (with "relaxed"): each epoch's relaxation of a structure starts where the previous epoch's
    ended, and its implicit CG solve from the previous solution. ``grad`` picks how the gradient goes through
    the relaxation (``relaxtune.relax.implicit.GRAD_MODES``), refined by ``truncate_steps``,
    ``checkpoint_every``, ``hybrid_steps`` / ``hybrid_head`` and the CG settings ``cg_tol``, ``cg_max_iter``,
    ``damping``. ``step_size`` is η (GD's step or FIRE's initial dt); ``learn_step`` trains it at ``step_lr``.

    Optimisation: AdamW (``lr``, ``weight_decay``; ``embedding_lr`` for the per-element embeddings), linear
    warmup over ``warmup_frac`` of the steps then cosine decay to ``lr * min_lr_ratio`` (or constant),
    gradient-norm clipping at ``grad_clip`` (0 = off); validation, best.pt and the retention check see the
    moving average of the weights over the last ``average_epochs`` epochs (``relaxtune.train.averaging``; 0 =
    the trained weights themselves); ``train_params`` = all | readout | freeze-embeddings |
    comma-separated name fragments; ``low_rank`` r > 0 trains instead a rank-r update of each of those linear
    layers with the base weights fixed (``relaxtune.train.lowrank``).

    Keeping what pretraining knew (``relaxtune.train.distill``): every step also fits ``distill_per_step`` of
    the ``distill_per_prototype`` strained, rattled copies of each bulk crystal of the training elements to the
    pretrained model's energy, forces and stress, at ``distill_weight`` (0 = off; forces at ``distill_force_weight``,
    stress at ``stress_weight``);
    ``replay`` (a data spec, e.g. ``builtin:crystals:train``; "" = off) adds ``replay_weight`` x the frame loss of
    ``replay_per_step`` of its structures' DFT frames per step (``relaxtune.train.replay``);
    with ``distill_project`` the data gradient first loses its component against the gradient of those terms
    (gradient surgery, PCGrad), so a step on the defects does not undo the bulk to first order;
    ``anchor_weight`` adds λ·|θ - θ0|² (L2-SP) on the model's weights; with ``distill_orthogonal`` every
    update loses its component along the gradients (at the pretrained weights) of the energy per atom and the
    stress of each distillation structure, so the bulk's equation of state is unchanged to first order
    (orthogonal gradient descent; off when the training data relax cells, whose stresses it would not let fit). ``retention_check`` measures best.pt
    against the pretrained model after training (``relaxtune.retention``) into summary.json and the log.

    Validation: Dq of relaxations (``eval_optimizer`` to ``eval_fmax``) from ``val_start`` picks best.pt;
    ``patience`` epochs without an improvement of ``min_delta`` stop the run (0 = never).
    """

    model: str = "chgnet"
    objective: str = "structure+forces"
    # training relaxation
    optimizer: str = "auto"  # resolved on construction: lbfgs with grad="implicit", else fire
    steps: int = 150
    fmax: float = 0.02
    grad: str = "implicit"
    truncate_steps: int = 10
    checkpoint_every: int = 1
    hybrid_steps: int = 10
    hybrid_head: str = "checkpoint"
    cg_tol: float = 1e-2
    cg_max_iter: int = 100
    damping: float = 1e-3
    step_size: float | None = None  # η: GD step (Å²/eV, default 0.02) or FIRE's initial dt (default 0.1)
    learn_step: bool = False
    start: str = "relaxed"
    warm_start: bool = True
    step_lr: float = 1e-2
    # optimisation
    epochs: int = 15
    batch_size: int = 4
    lr: float = 1e-3
    embedding_lr: float | None = None
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    average_epochs: float = 0.0  # time constant of the weights' moving average in epochs (0 = no average)
    train_params: str = "all"
    # loss (structure objective)
    dq_weight: float = 1.0
    rmsd_weight: float = 0.0
    dq_scale: str = "pretrained"
    dq_scale_floor: float = 0.05
    # loss (forces objective)
    force_weight: float = 1.0
    energy_weight: float | None = None  # None: ENERGY_DEFAULTS of the objective
    energy_scale: str | None = None  # per atom (CHGNet's convention) or in total eV; None: ENERGY_DEFAULTS
    stress_weight: float = 0.1  # per GPa^2, on frames with a DFT stress
    fixed_cell_stress: bool = False  # also the stress of fixed-cell frames (e.g. the relaxed one), see above
    frame_chunk: int = 8
    frames_per_structure: int = 2  # structure+forces: DFT frames fitted per structure and step (0 = all)
    forces_mix: float = 100.0  # structure+forces: weight of the frame term ((eV/Å)^2) against Dq (√amu·Å)
    # keeping what pretraining knew
    distill_weight: float = 10.0  # weight of the self-distillation term (0 = off)
    distill_per_prototype: int = 4  # strained/rattled copies of each bulk prototype of the training elements
    distill_per_step: int = 8  # of those, fitted per optimizer step
    distill_force_weight: float = 1.0  # weight of the forces in the distillation loss (0: equation of state only)
    distill_project: bool = True  # remove from the data gradient its component against distillation's + replay's
    replay: str = ""  # data spec of DFT relaxations replayed at every step, e.g. builtin:crystals:train ("" = off)
    replay_weight: float = 10.0  # weight of the replay term (with ``replay`` set)
    replay_per_step: int = 8  # replay structures fitted per optimizer step
    low_rank: int = 0  # > 0: train a rank-r update B·A of each trainable linear layer, base weights fixed
    anchor_weight: float = 0.0  # L2-SP: λ of λ·|θ - θ0|² (per weight, summed)
    distill_orthogonal: bool = True  # each update orthogonal to the gradients of the bulk's energies and stresses
    retention_check: bool = True  # after training: best.pt against the pretrained model (relaxtune.retention)
    # validation / stopping
    eval_fmax: float = 0.02
    eval_max_steps: int = 500
    eval_optimizer: str = "lbfgs"
    val_start: str = "relaxed"
    patience: int = 0
    min_delta: float = 0.0
    # misc
    seed: int = 0
    dtype: str = "float32"
    max_force: float = 1e3

    @property
    def relax_step_field(self) -> str:
        """The ``RelaxConfig`` field that is η for this optimizer: GD's ``step_size`` or FIRE's initial ``dt``."""
        return RelaxConfig.step_field(self.optimizer)

    @property
    def relax_step_size(self) -> float:
        """The training relaxation's η: ``step_size``, or ``RelaxConfig``'s default for the optimizer."""
        if self.step_size is not None:
            return float(self.step_size)
        return float(getattr(RelaxConfig, self.relax_step_field))

    def __post_init__(self) -> None:
        scale, weight = ENERGY_DEFAULTS.get(self.objective, ENERGY_DEFAULTS["forces"])
        if self.energy_scale is None:
            object.__setattr__(self, "energy_scale", scale)
        if self.energy_weight is None:
            object.__setattr__(self, "energy_weight", weight)
        choices = {"objective": OBJECTIVES, "grad": GRAD_MODES[1:], "start": STARTS, "val_start": STARTS,
                   "dq_scale": DQ_SCALES, "energy_scale": ENERGY_SCALES, "schedule": SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.optimizer not in TRAIN_OPTIMIZERS:
            raise ValueError(f"optimizer: {self.optimizer!r} is not {', '.join(TRAIN_OPTIMIZERS)}")
        if self.optimizer == "auto":
            object.__setattr__(self, "optimizer", "lbfgs" if self.grad == "implicit" else "fire")
        if self.optimizer == "lbfgs" and self.grad != "implicit":
            raise ValueError(f"optimizer: lbfgs relaxes without a graph, so it serves --grad implicit only "
                             f"(got {self.grad}); use fire or gd")
        if self.eval_optimizer not in OPTIMIZERS:
            raise ValueError(f"eval_optimizer: {self.eval_optimizer!r} is not fire, gd or lbfgs")
        if self.hybrid_head not in HYBRID_HEADS:
            raise ValueError(f"hybrid_head: {self.hybrid_head!r} is not full or checkpoint")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not float32 or float64")
        if self.frames_per_structure < 0:
            raise ValueError(f"frames_per_structure: must be >= 0 (got {self.frames_per_structure})")
        for name in ("distill_weight", "anchor_weight", "distill_per_prototype", "low_rank", "distill_force_weight",
                     "average_epochs", "replay_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (got {getattr(self, name)})")
        for name in ("steps", "epochs", "batch_size", "truncate_steps", "checkpoint_every", "hybrid_steps",
                     "frame_chunk", "distill_per_step", "replay_per_step"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0 (got {self.lr})")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size: must be > 0 (got {self.step_size})")
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            raise ValueError(f"embedding_lr: must be > 0 (got {self.embedding_lr})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A config from ``to_dict`` output. A field that a stored config predates takes the value that held
        before the field existed (not today's default), so an old run resumes with its own settings."""
        known = {f.name for f in dataclasses.fields(cls)}
        legacy = {k: v for k, v in BEFORE_FIELD_EXISTED.items() if k not in data}
        return cls(**{**legacy, **{k: v for k, v in data.items() if k in known}})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
