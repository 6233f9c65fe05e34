"""load_model: names, files (MACE model vs relaxtune checkpoint) and one-line errors."""

import sys
import types

import pytest
import torch

from relaxtune.potentials import EnergyModel, load_model
from relaxtune.potentials.classical import LennardJones, StillingerWeber


def test_classical_names():
    assert isinstance(load_model("lj"), LennardJones)
    assert isinstance(load_model("SW"), StillingerWeber)


def test_chgnet_by_name():
    from relaxtune.potentials.chgnet import CHGNetModel

    model = load_model("chgnet")
    assert isinstance(model, CHGNetModel)
    assert next(model.parameters()).dtype == torch.float32


def test_sevennet_by_name():
    from relaxtune.potentials.sevennet import SevenNetModel

    assert isinstance(load_model("sevennet"), SevenNetModel)


def test_model_instance_passes_through():
    model = LennardJones()
    assert load_model(model) is model


@pytest.mark.parametrize("spec", ["nonsense", "no/such/file.pt", ""])
def test_unknown_spec_is_one_line_value_error(spec):
    with pytest.raises(ValueError) as info:
        load_model(spec)
    message = str(info.value)
    assert "\n" not in message
    for choice in ("chgnet", "sevennet", "lj", "sw", "MACE", "checkpoint"):
        assert choice in message


def test_checkpoint_file_routes_to_trainer_loader(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("relaxtune.train.checkpoint")

    def load_checkpoint_model(path, dtype=None):
        calls.append((str(path), dtype))
        return LennardJones()

    fake.load_checkpoint_model = load_checkpoint_model
    monkeypatch.setitem(sys.modules, "relaxtune.train.checkpoint", fake)
    path = tmp_path / "finetuned.pt"
    torch.save({"model_spec": "lj", "state_dict": {}}, path)
    assert isinstance(load_model(str(path), dtype=torch.float64), EnergyModel)
    assert calls == [(str(path), torch.float64)]


class _FakeMace(torch.nn.Module):
    pass


def test_mace_files_route_to_mace_adapter(tmp_path, monkeypatch):
    """``.model`` files, and torch files that pickle a ``mace.modules`` class, go to MACEModel."""
    import relaxtune.potentials.mace as mace_adapter

    seen = []
    monkeypatch.setattr(mace_adapter, "MACEModel", lambda path, dtype: seen.append(path.name) or LennardJones())
    # a module whose pickle names mace.modules.models._FakeMace, like a real MACE file does
    for name in ("mace", "mace.modules", "mace.modules.models"):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(_FakeMace, "__module__", "mace.modules.models")
    monkeypatch.setattr(sys.modules["mace.modules.models"], "_FakeMace", _FakeMace, raising=False)
    torch.save(_FakeMace(), tmp_path / "mace_model.pt")
    (tmp_path / "other.model").write_bytes(b"")
    load_model(str(tmp_path / "mace_model.pt"))
    load_model(str(tmp_path / "other.model"))
    assert seen == ["mace_model.pt", "other.model"]
