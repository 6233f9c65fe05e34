"""The package's imports point one way: state -> potentials -> relax -> data -> evaluate -> train -> cli.

Every ``import relaxtune...`` in src/ (at the top of a module or inside a function) is read from the source,
and each module's layer must be above the layer of everything it imports: no cycle, nothing that runs back up.
"""

import ast
from pathlib import Path

import relaxtune

SRC = Path(relaxtune.__file__).resolve().parent

#: each part of the package and its layer; a part imports only from lower layers (or from itself)
LAYERS = {
    "relaxtune": 0, "relaxtune.state": 0,
    "relaxtune.neighbors": 1, "relaxtune.metrics": 1,
    "relaxtune.potentials": 2, "relaxtune.symmetry": 2,
    "relaxtune.calculator": 3, "relaxtune.relax": 3,
    "relaxtune.data": 4,
    "relaxtune.evaluate": 5,
    "relaxtune.retention": 6,
    "relaxtune.train": 7,
    "relaxtune.report": 8,
    "relaxtune.cli": 9, "relaxtune.__main__": 10,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every relaxtune import in the package."""
    out = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            out += [(module, name, node.lineno) for name in names if name.split(".")[0] == "relaxtune"]
    return out


def test_every_part_has_a_layer():
    parts = {_part(m) for m, _, _ in _imports()} | {_part(t) for _, t, _ in _imports()}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


def test_imports_point_down_the_layers():
    upward = [f"{m}:{line} imports {t}" for m, t, line in _imports()
              if _part(m) != _part(t) and LAYERS[_part(t)] >= LAYERS[_part(m)]]
    assert upward == []
