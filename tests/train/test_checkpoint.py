"""Checkpoints: atomic writes, weights-only loading, fine-tuned models loadable wherever a model is accepted."""

import pytest
import torch

from relaxtune.potentials import load_model
from relaxtune.potentials.classical import StillingerWeber
from relaxtune.potentials import load_checkpoint_model
from relaxtune.potentials.checkpoint import base_model_spec, read_checkpoint, unseen_species
from relaxtune.train import checkpoint as ckpt
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import Trainer


def test_checkpoint_roundtrip_gives_the_trained_model_everywhere(sw_pairs, tmp_path):
    cfg = TrainConfig(model="sw", dtype="float64", optimizer="gd", steps=200, fmax=1e-3, grad="implicit", epochs=1,
                      batch_size=2, lr=1e-2, learn_step=True, eval_fmax=1e-3, distill_weight=0.0,
                      retention_check=False)
    Trainer(cfg, sw_pairs[:2], sw_pairs[4:], tmp_path, progress=False).run()
    data = torch.load(tmp_path / "last.pt", weights_only=True)  # no pickled classes: safe to load
    assert data["format"] == ckpt.FORMAT and data["model_spec"] == "sw" and data["epoch"] == 1
    assert {"optimizer", "scheduler", "rng", "history"} <= set(data["trainer"])
    assert "trainer" not in torch.load(tmp_path / "best.pt", weights_only=True)
    model = load_checkpoint_model(tmp_path / "last.pt")
    same = load_model(str(tmp_path / "last.pt"))
    for name, value in data["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[name], value)
        torch.testing.assert_close(same.state_dict()[name], value)
    assert float(model.sigma.detach()) != StillingerWeber().sigma.item()  # trained, not the default
    sp = ckpt.load_checkpoint_step_params(tmp_path / "last.pt")
    assert sp is not None and sp.step_size.item() > 0
    # fine-tuning a checkpoint stores the base model, not the path
    assert base_model_spec(str(tmp_path / "best.pt")) == "sw"
    # ... and the elements it was trained on, to warn about structures with others
    assert model.train_species == ["Si"] and unseen_species(model, [sw_pairs[0].initial]) is None
    other = sw_pairs[0].initial.copy()
    other.symbols[0] = "Ge"
    warning = unseen_species(model, [sw_pairs[0].initial, other])
    assert warning.startswith("warning: Ge not in the fine-tuning data of") and "trained on Si" in warning
    assert unseen_species(load_model("sw"), [other]) is None  # a pretrained model: nothing to say


def test_checkpoint_as_ase_calculator(sw_pairs, tmp_path):
    from relaxtune.calculator import RelaxtuneCalculator

    truth = StillingerWeber(sigma=2.2)
    ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "model_spec": "sw", "dtype": "float64",
                      "state_dict": truth.state_dict(), "step_params": None, "config": {}}, tmp_path / "m.pt")
    atoms = sw_pairs[0].initial.copy()
    atoms.calc = RelaxtuneCalculator(str(tmp_path / "m.pt"))
    e_ckpt = atoms.get_potential_energy()
    atoms.calc = RelaxtuneCalculator(truth)
    assert e_ckpt == pytest.approx(atoms.get_potential_energy(), rel=1e-10)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "value": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"format": ckpt.FORMAT, "value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_not_a_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable relaxtune checkpoint"):
        read_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"some": "dict"}, other)
    with pytest.raises(ValueError, match="not a relaxtune checkpoint"):
        load_checkpoint_model(other)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    path_state = torch.load(_save(state), weights_only=True)
    ckpt.set_rng_state(path_state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(a[0], b[0])
    assert np.allclose(a[1], b[1]) and a[2] == b[2]


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
