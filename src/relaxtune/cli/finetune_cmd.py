"""``relaxtune finetune``: fine-tune a pretrained potential through relaxations (or on energies and forces).

    relaxtune finetune builtin:si-defects --out runs/si                       # the default recipe
    relaxtune finetune builtin:si-defects --out runs/si --grad full --steps 50 --optimizer gd --learn-step --start initial
    relaxtune finetune train/ --val val/ --out runs/mine --model chgnet --epochs 10
    relaxtune finetune builtin:si-defects --out runs/baseline --objective forces   # conventional baseline
    relaxtune finetune builtin:si-defects --out runs/si --resume              # continue a killed run
    relaxtune finetune builtin:si-defects --out runs/si --overwrite           # start that run afresh

TRAIN / --val: a file, a directory, INITIAL:FINAL, DIR:SPLIT, builtin:NAME or builtin:NAME:SPLIT. When TRAIN's
pairs carry a split (a dataset with splits.json, e.g. builtin:si-defects), only its ``train`` split is trained
on and, without --val, its ``val`` split validates; test structures are never touched.
Writes DIR/best.pt, DIR/last.pt, DIR/metrics.csv, DIR/summary.json and DIR/config.yaml (the resolved settings,
reusable with --config). last.pt is written after every epoch: an interrupted run (Ctrl-C: exit code 130) loses
at most the epoch under way, and --resume continues it. A folder that holds a run is never overwritten unless
--overwrite says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional

import typer
import yaml

from relaxtune.data import DataError, dataset_of, has_splits, load_pairs, train_and_val
from relaxtune.potentials.checkpoint import read_checkpoint
from relaxtune.train import distributed
from relaxtune.train.finetune import finetune
from relaxtune.cli.common import (CONVENTION, DTYPES, GRADS, HYBRID_HEADS, OPTIMIZERS, STARTS, THREADS_HELP,
                           UserInputError, app, can_create_in, check_model, default_dtype, file_error, note_on_abort,
                           one_line, path_given_once, use_threads)
from relaxtune.train.config import DQ_SCALES, ENERGY_SCALES, OBJECTIVES, TRAIN_OPTIMIZERS, TrainConfig

#: what a run writes to its folder: --overwrite deletes these (and nothing else) before it starts
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "summary.json", "config.yaml")
#: the CLI's defaults are the library's (one place to change them), read without building a config (no torch)
DEFAULTS = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})
#: TrainConfig's fields; an option of ``finetune`` named as one of them sets it (tests/cli checks both ways)
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
#: the fields without an option (tuning knobs of the loss, the schedule, CG and validation): a --config file sets them
CONFIG_FILE_ONLY = frozenset({
    "cg_max_iter", "damping", "schedule", "warmup_frac", "min_lr_ratio", "dq_weight", "rmsd_weight", "dq_scale_floor",
    "force_weight", "frame_chunk", "distill_per_prototype", "distill_per_step", "distill_force_weight",
    "replay_per_step", "eval_fmax", "eval_max_steps", "eval_optimizer", "min_delta", "max_force",
})


def _load_pairs(spec: str, option: str) -> list:
    try:
        return load_pairs(spec)
    except (DataError, FileNotFoundError, ValueError) as exc:
        raise file_error(f"{option} {spec}", exc) from None


def resolve_data(train_spec: str, val_spec: str | None) -> tuple[list, list, str]:
    """(train pairs, validation pairs, a one-line description of where they came from)."""
    pairs = _load_pairs(train_spec, "TRAIN")
    split = has_splits(pairs)
    train, val = train_and_val(pairs)
    note = f"{train_spec}: " + ("split 'train'" if split else "all structures")
    if val_spec:
        val = _load_pairs(val_spec, "--val")
        note += f"; validation: {val_spec}"
    elif split:
        note += "; validation: split 'val'"
    else:
        note += "; no validation set (best.pt = lowest training loss)"
    if not train:
        raise UserInputError(f"TRAIN {train_spec}: no training structures" + (" in split 'train'" if split else ""))
    overlap = {p.name for p in train} & {p.name for p in val}
    if overlap:
        raise UserInputError(f"--val {val_spec}: structures also in the training set: {', '.join(sorted(overlap))}")
    return train, val, note


def check_run_folder(out: Path, resume: bool, overwrite: bool = False) -> None:
    """Before any compute: ``out`` must be a folder we can write, and a finished or killed run there is only
    continued with ``--resume``, or started afresh with ``--overwrite``; never overwritten unasked."""
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite: give one (continue the run in --out, or start it afresh)")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out}: is a file, not a folder")
    if (out / "last.pt").exists() and not (resume or overwrite):
        raise UserInputError(f"--out {out}: already holds a run (last.pt); continue it with --resume, start it "
                             "afresh with --overwrite, or choose another folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK) or not can_create_in(existing):
        raise UserInputError(f"--out {out}: {existing} is not writable")


def clear_run_folder(out: Path) -> list[str]:
    """``--overwrite``: delete the files an earlier run wrote to ``out`` (:data:`RUN_FILES`, nothing else), so that
    the new run is never mixed with the old one's; returns their names."""
    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    return removed


def apply_config_file(config: TrainConfig, path: Path, given: set[str]) -> TrainConfig:
    """``config`` with the TrainConfig fields of YAML file ``path``, except those in ``given`` (options typed on
    the command line win). One-line errors name the file and the field."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"--config {path}: {' '.join(str(exc).split())[:200]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserInputError(f"--config {path}: not a mapping of setting: value")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise UserInputError(f"--config {path}: field {key!r}: not a fine-tuning setting (see relaxtune "
                                 "finetune --help; names as in TrainConfig, with underscores)")
        kind = str(fields[key].type)
        try:
            if value is None or key in given:
                pass
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif kind == "int":
                value = int(value)
            elif "float" in kind:
                value = float(value)  # YAML reads 1e-3 (no dot) as a string
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"--config {path}: field {key!r}: {value!r}: {exc}") from None
        values[key] = value
    merged = {**values, **{k: v for k, v in config.to_dict().items() if k in given}}
    if "dtype" not in merged:
        merged["dtype"] = default_dtype(merged.get("model", config.model))
    try:
        return TrainConfig(**merged)
    except ValueError as exc:
        raise UserInputError(f"--config {path}: {exc}") from None


def given_on_command_line(ctx: typer.Context) -> set[str]:
    """Names of the parameters the user typed (not defaults)."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}


#: settings a resumed run may change: more epochs, another patience
RESUMABLE_CHANGES = ("epochs", "patience")


def check_resume_options(out: Path, config: TrainConfig) -> None:
    """A resumed run continues with its stored settings; refuse, in one line, options that say otherwise."""
    last = out / "last.pt"
    if not last.exists():
        return
    try:
        stored = TrainConfig.from_dict(read_checkpoint(last)["config"]).to_dict()
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserInputError(f"--resume: {last}: {' '.join(str(exc).split())}") from None
    given = config.to_dict()
    changed = [f"{k} {stored[k]} -> {given[k]}" for k in given
               if k not in RESUMABLE_CHANGES and k in stored and stored[k] != given[k]]
    if changed:
        raise UserInputError(f"--resume: options differ from the run stored in {last}: {'; '.join(changed)}. Give "
                             "the run's own options, or add --force to continue with the stored ones")


@app.command("finetune", epilog=CONVENTION)
def finetune_command(
    cli_context: typer.Context,
    train: str = typer.Argument(..., help="Training relaxation pairs (file, directory, builtin:NAME, ...)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A YAML file of TrainConfig fields (every "
                                               "setting below, by field name: lr, distill_weight, ...; and those "
                                               "without an option: " + ", ".join(sorted(CONFIG_FILE_ONLY)) + "); "
                                               "options given on the command line override it.", rich_help_panel="Data and output"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder to write (required): best.pt, last.pt, "
                                       "metrics.csv, summary.json, config.yaml.", rich_help_panel="Data and output"),
    out_short: Optional[Path] = typer.Option(None, "-o", hidden=True, help="Old spelling of --out."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation pairs (default: TRAIN's own 'val' split).", rich_help_panel="Data and output"),
    model: str = typer.Option(DEFAULTS.model, "--model", "-m", help="chgnet, sevennet, sw, lj, a MACE file or a checkpoint.", rich_help_panel="Model"),
    steps: int = typer.Option(DEFAULTS.steps, "--steps", help="Relaxation steps k per training relaxation (max).", rich_help_panel="Training relaxation"),
    optimizer: Literal[TRAIN_OPTIMIZERS] = typer.Option(DEFAULTS.optimizer, "--optimizer", help="Relaxation "
                                                        "optimizer: auto is lbfgs with --grad implicit, else fire "
                                                        "(lbfgs with --grad implicit only).", rich_help_panel="Training relaxation"),
    grad: Literal[GRADS] = typer.Option(DEFAULTS.grad, "--grad", help="How the gradient passes through the "
                                        "relaxation.", rich_help_panel="Gradient through the relaxation"),
    step_size: Optional[float] = typer.Option(None, "--step-size", help="Relaxation step size η: GD step "
                                              "(Å²/eV, default 0.02) or FIRE's initial dt (default 0.1).", rich_help_panel="Training relaxation"),
    learn_step: bool = typer.Option(DEFAULTS.learn_step, "--learn-step", help="Also train the relaxation step size "
                                    "(starting at --step-size).", rich_help_panel="Training relaxation"),
    start: Literal[STARTS] = typer.Option(DEFAULTS.start, "--start", help="Training relaxations start at the initial "
                                          "structure (the reference method) or at the DFT-relaxed one.", rich_help_panel="Training relaxation"),
    objective: Literal[OBJECTIVES] = typer.Option(DEFAULTS.objective, "--objective",
                                  help="structure+forces (Dq + DFT frames; default) | structure (Dq) | forces (baseline).", rich_help_panel="Objective"),
    forces_mix: float = typer.Option(DEFAULTS.forces_mix, "--forces-mix", help="structure+forces: weight of the DFT-frame "
                                     "energy/force MSE against Dq.", rich_help_panel="Objective"),
    stress_weight: float = typer.Option(DEFAULTS.stress_weight, "--stress-weight", min=0.0,
                                        help="Weight of the stress MSE (GPa^2) on DFT frames that carry a stress "
                                        "(cell relaxations), next to forces (1) and energies (--energy-weight).", rich_help_panel="Objective"),
    energy_weight: Optional[float] = typer.Option(None, "--energy-weight", min=0.0,
                                                  help="Weight of the squared error of each DFT frame's energy "
                                                  "relative to the relaxed frame, next to the force MSE (weight 1). "
                                                  "Default: 0.1, or 1 with --objective forces.", rich_help_panel="Objective"),
    energy_scale: Optional[Literal[ENERGY_SCALES]] = typer.Option(None, "--energy-scale",
                                               help="per-atom ((eV/atom)^2, CHGNet's convention) | total (eV^2: the "
                                               "energy differences between a defect's configurations). Default: "
                                               "total, or per-atom with --objective forces.", rich_help_panel="Objective"),
    fixed_cell_stress: bool = typer.Option(DEFAULTS.fixed_cell_stress, "--fixed-cell-stress",
                                           help="Also fit the stress that frames of fixed-cell relaxations carry "
                                           "(off: on the Γ-only Si defects it cost accuracy on unseen types).", rich_help_panel="Objective"),
    frames_per_structure: int = typer.Option(DEFAULTS.frames_per_structure, "--frames-per-structure", min=0,
                                             help="structure+forces: DFT frames fitted per structure and step (the "
                                             "relaxed one and one per stratum of the path, weighted to estimate the "
                                             "mean over all frames); 0 = every frame.", rich_help_panel="Objective"),
    warm_start: bool = typer.Option(DEFAULTS.warm_start, "--warm-start/--cold-start",
                                    help="With --start relaxed: each epoch's training relaxation (and implicit CG "
                                    "solve) of a structure starts where the previous epoch's ended.", rich_help_panel="Training relaxation"),
    cg_tol: float = typer.Option(DEFAULTS.cg_tol, "--cg-tol", min=1e-12, help="Relative residual at which the "
                                 "implicit gradient's CG solve stops (--grad implicit | hybrid).", rich_help_panel="Gradient through the relaxation"),
    distill_weight: float = typer.Option(DEFAULTS.distill_weight, "--distill-weight", min=0.0,
                                         help="Weight of self-distillation: each step also fits strained, rattled "
                                         "bulk crystals of the training elements to the pretrained model's energy, "
                                         "forces and stress, so the host keeps its lattice constant (0 = off).", rich_help_panel="Keeping what the pretrained model knew"),
    anchor_weight: float = typer.Option(DEFAULTS.anchor_weight, "--anchor-weight", min=0.0,
                                        help="L2-SP: λ of λ·|θ - θ0|², a pull of every weight back to its "
                                        "pretrained value (0 = off).", rich_help_panel="Keeping what the pretrained model knew"),
    distill_orthogonal: bool = typer.Option(DEFAULTS.distill_orthogonal, "--distill-orthogonal/--no-distill-orthogonal",
                                            help="Take every update orthogonal to the gradients of the bulk "
                                            "crystals' energies and stresses, so that no step changes them to first "
                                            "order (orthogonal gradient descent).",
                                            rich_help_panel="Keeping what the pretrained model knew"),
    distill_project: bool = typer.Option(DEFAULTS.distill_project, "--distill-project/--no-distill-project",
                                         help="Gradient surgery: drop the part of each step's data gradient that "
                                         "points against the self-distillation gradient.", rich_help_panel="Keeping what the pretrained model knew"),
    replay: str = typer.Option(DEFAULTS.replay, "--replay", metavar="DATA",
                               help="DFT relaxations to replay: each step also fits a few of their DFT frames "
                               "(energy, forces, stress), e.g. builtin:crystals:train or your own bulk "
                               "relaxations at the training data's level of theory (default: none).",
                               rich_help_panel="Keeping what the pretrained model knew"),
    replay_weight: float = typer.Option(DEFAULTS.replay_weight, "--replay-weight", min=0.0,
                                        help="Weight of the replay term (with --replay).",
                                        rich_help_panel="Keeping what the pretrained model knew"),
    low_rank: int = typer.Option(DEFAULTS.low_rank, "--low-rank", min=0,
                                 help="Train a rank-r update of every trainable linear layer (LoRA-style), base "
                                 "weights fixed; checkpoints hold the merged weights (0 = train the weights).", rich_help_panel="Keeping what the pretrained model knew"),
    retention_check: bool = typer.Option(DEFAULTS.retention_check, "--retention/--no-retention",
                                         help="After training, check best.pt against the pretrained model on the "
                                         "bulk crystals of the training elements (summary.json 'retention').", rich_help_panel="Keeping what the pretrained model knew"),
    dq_scale: Literal[DQ_SCALES] = typer.Option(DEFAULTS.dq_scale, "--dq-scale", help="absolute (mean Dq) | pretrained (mean of Dq "
                                 "divided by the pretrained model's Dq of each training structure).", rich_help_panel="Objective"),
    epochs: int = typer.Option(DEFAULTS.epochs, "--epochs", help="Epochs.", rich_help_panel="Optimisation and validation"),
    lr: float = typer.Option(DEFAULTS.lr, "--lr", help="AdamW learning rate of the model weights.", rich_help_panel="Optimisation and validation"),
    embedding_lr: Optional[float] = typer.Option(DEFAULTS.embedding_lr, "--embedding-lr", help="Learning rate of "
                                                 "the per-element embeddings (default: --lr).", rich_help_panel="Model"),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", help="Structures relaxed together per optimizer step.", rich_help_panel="Optimisation and validation"),
    train_params: str = typer.Option(DEFAULTS.train_params, "--train-params",
                                     help="all | readout | freeze-embeddings | comma-separated name fragments.", rich_help_panel="Model"),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Random seed (data order).", rich_help_panel="Optimisation and validation"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt; options that differ from the "
                                "stored run are refused (--epochs and --patience may change).", rich_help_panel="Data and output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in an --out that holds a run: first "
                                   "deletes its best.pt, last.pt, metrics.csv, summary.json and config.yaml (other "
                                   "files stay).", rich_help_panel="Data and output"),
    force: bool = typer.Option(False, "--force", help="With --resume: continue with the stored settings even where "
                               "the options given differ.", rich_help_panel="Data and output"),
    fmax: float = typer.Option(DEFAULTS.fmax, "--fmax", help="Convergence of training relaxations (eV/Å).", rich_help_panel="Training relaxation"),
    truncate_steps: int = typer.Option(DEFAULTS.truncate_steps, "--truncate-steps", help="Steps kept by --grad truncated.", rich_help_panel="Gradient through the relaxation"),
    checkpoint_every: int = typer.Option(DEFAULTS.checkpoint_every, "--checkpoint-every", help="Block length of --grad checkpoint.", rich_help_panel="Gradient through the relaxation"),
    hybrid_steps: int = typer.Option(DEFAULTS.hybrid_steps, "--hybrid-steps", help="Unrolled head of --grad hybrid.", rich_help_panel="Gradient through the relaxation"),
    hybrid_head: Literal[HYBRID_HEADS] = typer.Option(DEFAULTS.hybrid_head, "--hybrid-head", help="Head of --grad hybrid.", rich_help_panel="Gradient through the relaxation"),
    val_start: Literal[STARTS] = typer.Option(DEFAULTS.val_start, "--val-start", help="Validation relaxations start at "
                                              "the initial or the DFT-relaxed structures (best.pt follows that Dq).", rich_help_panel="Optimisation and validation"),
    patience: int = typer.Option(DEFAULTS.patience, "--patience", help="Early stopping after N epochs without improvement (0 = off).", rich_help_panel="Optimisation and validation"),
    weight_decay: float = typer.Option(DEFAULTS.weight_decay, "--weight-decay", help="AdamW weight decay.", rich_help_panel="Optimisation and validation"),
    grad_clip: float = typer.Option(DEFAULTS.grad_clip, "--grad-clip", help="Gradient-norm clipping per group (0 = off).", rich_help_panel="Optimisation and validation"),
    average_epochs: float = typer.Option(DEFAULTS.average_epochs, "--average-epochs", min=0.0, help="Validation, best.pt and the retention check use the moving average of the weights over about this many epochs (0 = the trained weights).", rich_help_panel="Optimisation and validation"),
    step_lr: float = typer.Option(DEFAULTS.step_lr, "--step-lr", help="Learning rate of the relaxation parameters.", rich_help_panel="Training relaxation"),
    dtype: Optional[Literal[DTYPES]] = typer.Option(None, "--dtype", help="Default: float64 for sw/lj, else float32.", rich_help_panel="Model"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars.", rich_help_panel="Machine"),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP, rich_help_panel="Machine"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default cpu; under torchrun "
                                         "each rank's own GPU cuda:LOCAL_RANK when CUDA is available).", rich_help_panel="Machine"),
) -> None:
    """Fine-tune a model by backpropagating through relaxations.

    With the defaults, builtin:si-defects-mini (10 structures of 64 atoms, 15 epochs) takes about 4.5 minutes on
    a 2-core CPU, the retention check included; each epoch's log line gives the elapsed time, structures/s and the
    time left.
    """
    options = {name: value for name, value in locals().items() if name in CONFIG_FIELDS}  # first: only the options
    out = path_given_once(out, "--out", out_short, "-o", "the run folder to write")
    use_threads(threads)
    try:  # under torchrun: join the process group (data-parallel over the ranks; see train/distributed.py)
        ctx = distributed.init_from_env(device)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    if dtype is None:
        dtype = default_dtype(model)
    try:
        config = TrainConfig(**{**options, "dtype": dtype})
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    if config_file is not None:
        config = apply_config_file(config, config_file, given_on_command_line(cli_context))
    check_model(config.model)
    check_run_folder(out, resume, overwrite)
    if resume and not force:
        check_resume_options(out, config)
    train_pairs, val_pairs, note = resolve_data(train, val)
    if config.replay:
        _load_pairs(config.replay, "--replay")  # a bad spec fails here, before any compute
    if overwrite and ctx.is_main:
        removed = clear_run_folder(out)
        if removed:
            typer.echo(f"--overwrite: deleted {', '.join(removed)} of the earlier run in {out}", err=True)
    if ctx.is_main:
        typer.echo(f"training on {len(train_pairs)} structures, validating on {len(val_pairs)} ({note})"
                   + (f" on {ctx.world_size} ranks ({ctx.backend})" if ctx.active else ""), err=True)
    data = dataset_of(train)  # recorded in summary.json: the report's default data
    try:
        if ctx.active or ctx.device.type != "cpu":
            summary = distributed.finetune_distributed(config, train_pairs, val_pairs, out, ctx, resume=resume,
                                                       progress=progress, log=lambda m: typer.echo(m, err=True),
                                                       data=data)
        else:
            summary = finetune(config, train_pairs, val_pairs, out, resume=resume, progress=progress,
                               log=lambda m: typer.echo(m, err=True), data=data)
    except ValueError as exc:
        raise UserInputError(one_line(exc)) from None
    except KeyboardInterrupt:
        if (out / "last.pt").exists():
            note_on_abort(f"{out}/last.pt holds the last finished epoch; --resume continues the run")
        raise
    distributed.shutdown(ctx)
    if not ctx.is_main:
        return
    before, after = summary["val_before"], summary["val_after"]
    if summary["best_epoch"] == 0 and val_pairs:
        typer.echo("no epoch lowered validation Dq below the pretrained model's: best.pt is the pretrained model "
                   "(last.pt holds the last epoch)", err=True)
    typer.echo(json.dumps({
        "out": str(out), "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
        "val_dq_before": before.get("dq_mean"), "val_dq_after": after.get("dq_mean"),
        "model_movement": summary["parameter_movement"]["model"]["relative"],
        "relax_movement": summary["parameter_movement"].get("relax", {}).get("relative"),
        "skipped_structures": summary["skipped_structures"],
        **({"retention": {"kept": summary["retention"]["kept"], **summary["retention"]["counts"]}}
           if "retention" in summary else {}),
    }, indent=2))

