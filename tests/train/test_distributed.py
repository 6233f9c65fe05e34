"""Data-parallel fine-tuning and evaluation (relaxtune.train.distributed): two CPU ranks over gloo on
127.0.0.1, launched by torchrun (``python -m torch.distributed.run``) as a user would, train to the same
weights and metrics as one process with the same global batch, resume from last.pt, and evaluate to the same
metrics. Data: real DFT frames of the shipped Si vacancy relaxation (builtin:si-defects), Stillinger-Weber in
float64, FIRE with the full unrolled gradient."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase.io import write

from relaxtune.cli import main
from relaxtune.data import load_pairs
from relaxtune.potentials import load_model
from relaxtune.train import distributed
from relaxtune.train.history import METRIC_FIELDS

# 4 training structures in global batches of 3: the shares of the first batch are 2 and 1 (unequal), of
# the second 1 and 0 (rank 1 has nothing to relax): the loss must still be the mean over the global batch.
# Warm starts (the default): a structure relaxed on another rank next epoch starts where one process starts it,
# fresh and resumed.
TRAIN_ARGS = ["--model", "sw", "--optimizer", "fire", "--steps", "12", "--fmax", "0.05", "--grad", "full",
              "--learn-step", "--batch-size", "3", "--lr", "0.003", "--objective", "structure", "--no-progress",
              "--distill-weight", "0", "--no-retention"]
DRIVER = Path(__file__).with_name("dist_driver.py")
SKIP_DRIVER = Path(__file__).with_name("dist_skip_driver.py")
EVAL_ARGS = ["--model", "sw", "--fmax", "0.05", "--max-steps", "30", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def si_data(tmp_path_factory):
    """train/ (4) and val/ (2) pairs: DFT trajectory frames of the Si vacancy → its DFT-relaxed structure."""
    pairs = load_pairs("builtin:si-defects")
    si = [p for p in pairs if set(p.initial.get_chemical_symbols()) == {"Si"} and p.trajectory]
    assert si, "builtin:si-defects has no pure-Si relaxation with a trajectory"
    # the vacancy (else the longest trajectory: the dataset is still growing)
    traj = max(si, key=lambda p: (p.group == "vacancy", len(p.trajectory), p.name)).trajectory
    assert len(traj) >= 7
    root = tmp_path_factory.mktemp("si_vacancy")
    frames_of = {"train": [0, 1, 2, 3], "val": [len(traj) // 2 + 1, len(traj) - 2]}
    for split, ks in frames_of.items():
        (root / split).mkdir()
        for k in ks:
            frames = []
            for src in (traj[k], traj[-1]):
                a = src.copy()
                a.info = {}
                a.calc = src.calc  # keeps the DFT energy and forces
                frames.append(a)
            write(root / split / f"si_vac_f{k}.extxyz", frames, format="extxyz")
    (root / "all").mkdir()  # 6 structures to evaluate: 3 per rank, in chunks of 2 and 1
    for f in sorted((root / "train").iterdir()) + sorted((root / "val").iterdir()):
        shutil.copy(f, root / "all" / f.name)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS`` on 127.0.0.1 (gloo: no GPU needed)."""
    return python("-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
                  "127.0.0.1", "--master_port", _free_port(), *args)


def python(*args) -> subprocess.CompletedProcess:
    """``python ARGS`` outside any torchrun environment, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_cli(*args) -> str:
    """``relaxtune ARGS`` in this process (one rank); returns stdout."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["relaxtune", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        assert not exc.code, err.getvalue()
    finally:
        sys.argv = saved
    return out.getvalue()


def _assert_same_run(one, two):
    """Two run directories hold the same weights, relaxation parameters, metrics and summary."""
    for name in ("last.pt", "best.pt"):
        a = torch.load(one / name, weights_only=True)
        b = torch.load(two / name, weights_only=True)
        assert a["epoch"] == b["epoch"]
        for k in a["state_dict"]:
            torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=1e-10, atol=1e-12)
        for k in a["step_params"] or {}:
            torch.testing.assert_close(b["step_params"][k], a["step_params"][k], rtol=1e-10, atol=1e-12)
    ra = list(csv.DictReader(open(one / "metrics.csv")))
    rb = list(csv.DictReader(open(two / "metrics.csv")))
    assert list(ra[0]) == list(rb[0]) == METRIC_FIELDS
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for x, y in zip(ra, rb):
        # every column but the wall time; train_n = structures in the loss over all ranks (each relaxed once, by
        # one rank), cg_iterations = those of the batched solve (the max over the ranks' shares)
        for key in METRIC_FIELDS:
            if key == "time_s":
                continue
            if x[key] in ("", "True", "False"):
                assert y[key] == x[key], key
            else:
                assert float(y[key]) == pytest.approx(float(x[key]), rel=1e-10, abs=1e-12), key
    sa = json.loads((one / "summary.json").read_text())
    sb = json.loads((two / "summary.json").read_text())
    assert sb["val_after"] == pytest.approx(sa["val_after"], rel=1e-10)
    assert sb["parameter_movement"]["model"]["relative"] == pytest.approx(
        sa["parameter_movement"]["model"]["relative"], rel=1e-8)
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # no stray temporary files


@pytest.fixture(scope="module")
def runs(si_data, tmp_path_factory):
    """The same commands on one process and on two ranks (two torchrun launches: the literal
    ``torchrun -m relaxtune finetune``, then a fresh-started resume and an evaluation in one launch)."""
    root = tmp_path_factory.mktemp("runs")
    train = [si_data / "train", "--val", si_data / "val", *TRAIN_ARGS]
    evaluate = ["evaluate", si_data / "all", *EVAL_ARGS]
    # one process: fresh (2 epochs), then resume of a copy to 3 epochs, then evaluate
    run_cli("finetune", *train, "--epochs", "2", "--out", root / "one")
    shutil.copytree(root / "one", root / "one_resumed")
    shutil.copytree(root / "one", root / "two_resumed")
    run_cli("finetune", *train, "--epochs", "3", "--resume", "--out", root / "one_resumed")
    run_cli(*evaluate, "--json", root / "one.json")
    # two ranks
    fresh = torchrun("-m", "relaxtune", "finetune", *train, "--epochs", "2", "--out", root / "two")
    commands = [["finetune", *train, "--epochs", "3", "--resume", "--out", root / "two_resumed"],
                [*evaluate, "--json", root / "two.json"]]
    more = torchrun(DRIVER, json.dumps([[str(a) for a in c] for c in commands]))
    return {"root": root, "fresh": fresh, "more": more}


@pytest.mark.slow
def test_two_ranks_with_warm_starts_train_to_the_weights_of_one_process(si_data, tmp_path):
    """Warm starts are shared by the ranks after every step, so a structure relaxed by another rank next epoch
    starts where one process would start it; every rank adds the same distillation and anchor gradients (the
    options given last win)."""
    train = [si_data / "train", "--val", si_data / "val", *TRAIN_ARGS, "--epochs", "2",
             "--distill-weight", "10", "--anchor-weight", "1"]
    run_cli("finetune", *train, "--out", tmp_path / "one")
    torchrun("-m", "relaxtune", "finetune", *train, "--out", tmp_path / "two")
    _assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_two_ranks_train_to_the_weights_of_one_process(runs):
    root, proc = runs["root"], runs["fresh"]
    assert "on 2 ranks (gloo)" in proc.stderr
    # rank 0 alone reports: one summary on stdout, one log line per epoch
    assert proc.stdout.count('"best_epoch"') == 1
    assert proc.stderr.count("epoch 2  train Dq") == 1  # objective structure: Dq (relative to pretrained)
    trained = torch.load(root / "two" / "last.pt", weights_only=True)["state_dict"]
    pretrained = load_model("sw", dtype=torch.float64).state_dict()
    assert max(float((trained[k] - v).abs().max()) for k, v in pretrained.items()) > 1e-4  # it did train
    _assert_same_run(root / "one", root / "two")


@pytest.mark.slow
def test_two_ranks_resume_like_one_process(runs):
    """Every rank loads last.pt and continues; the result equals the one-process continuation."""
    root = runs["root"]
    assert runs["more"].stderr.count("resumed from") == 1
    assert len(list(csv.DictReader(open(root / "two_resumed" / "metrics.csv")))) == 4
    _assert_same_run(root / "one_resumed", root / "two_resumed")


@pytest.mark.slow
def test_evaluate_on_two_ranks_gives_the_metrics_of_one(runs):
    root = runs["root"]
    assert runs["more"].stdout.count('"dq_mean"') == 1  # printed by rank 0 only
    one = json.loads((root / "one.json").read_text())
    two = json.loads((root / "two.json").read_text())
    assert one["n"] == two["n"] == 6
    assert [r["name"] for r in two["rows"]] == [r["name"] for r in one["rows"]]
    for key in ("dq_mean", "dq_median", "rmsd_mean", "max_disp_mean", "basin_match_rate", "converged_rate",
                "steps_mean", "energy_mae_per_atom"):
        assert two[key] == pytest.approx(one[key], rel=1e-10, abs=1e-12), key
    for ra, rb in zip(one["rows"], two["rows"]):
        assert rb["steps"] == ra["steps"]
        assert rb["dq"] == pytest.approx(ra["dq"], rel=1e-10, abs=1e-12)


@pytest.mark.slow
def test_a_batch_that_raises_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """The rank whose share raised says so in the step's reduction, so every rank skips that batch as one
    process does, and none waits for the rank that raised: the run ends with the weights of one process."""
    python(SKIP_DRIVER, tmp_path / "one")
    proc = torchrun(SKIP_DRIVER, tmp_path / "two")
    assert proc.stderr.count("skipped a batch") == 2  # once per epoch, by rank 0 whichever rank raised
    assert "non-finite positions" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "two" / "metrics.csv")))
    assert [(r["skipped_batches"], r["skipped_structures"]) for r in rows[1:]] == [("1", "2"), ("1", "2")]
    _assert_same_run(tmp_path / "one", tmp_path / "two")


# ---------------------------------------------------------------------------------------------- in-process
def test_shard_deals_every_item_to_exactly_one_rank():
    items = list(range(7))
    shares = [distributed.shard(items, distributed.DistContext(rank=r, world_size=3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert distributed.shard([1], distributed.DistContext(rank=1, world_size=2)) == []


def test_single_process_context_needs_no_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (0, 1, False, True)
    assert ctx.device == torch.device("cpu") and not torch.distributed.is_initialized()
    distributed.shutdown(ctx)  # a no-op
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.resolve_device("cuda")


def test_reduce_gradients_single_rank_scales_and_fills_missing_grads():
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float32))
    a.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    distributed.reduce_gradients([a, b], distributed.DistContext(), scale=2.0)
    assert a.grad.tolist() == [2.0, 4.0, 6.0]
    assert b.grad.dtype == torch.float32 and b.grad.tolist() == [0.0, 0.0]
