"""load_model: names, files (MACE model vs relaxtune checkpoint) and one-line errors."""

import subprocess
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


@pytest.mark.parametrize("spec", ["nonsense", ""])
def test_unknown_spec_is_one_line_value_error(spec):
    with pytest.raises(ValueError) as info:
        load_model(spec)
    message = str(info.value)
    assert "\n" not in message
    for choice in ("chgnet", "sevennet", "lj", "sw", "MACE", "checkpoint"):
        assert choice in message


def test_a_missing_file_is_named_as_missing(tmp_path):
    with pytest.raises(ValueError, match="no/such/file.pt: no such file"):
        load_model("no/such/file.pt")
    with pytest.raises(ValueError, match="a folder: give the checkpoint in it"):
        load_model(str(tmp_path))


def test_loading_a_checkpoint_needs_no_training_code(tmp_path):
    """A fine-tuned checkpoint loads through the models' own reader: relaxtune.train is never imported."""
    from relaxtune.potentials.checkpoint import FORMAT, VERSION

    path = tmp_path / "finetuned.pt"
    weights = {k: v * 1.01 for k, v in LennardJones().state_dict().items()}
    torch.save({"format": FORMAT, "version": VERSION, "model_spec": "lj", "dtype": "float64",
                "state_dict": weights, "train_species": ["Ar"]}, path)
    code = ("import sys, relaxtune.potentials as p; m = p.load_model(sys.argv[1]); "
            "assert not any(k.startswith('relaxtune.train') for k in sys.modules), sorted(sys.modules); "
            "print(m.train_species, float(next(iter(m.state_dict().values()))))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("['Ar']") and float(out.stdout.split()[-1]) == pytest.approx(
        float(next(iter(weights.values()))))


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
