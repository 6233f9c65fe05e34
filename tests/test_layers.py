"""The package's imports point one way: state -> potentials -> relax -> data -> dft -> evaluate -> train -> cli.

Every import of a relaxtune module in src/ is read from the source: at the top of a module or inside a
function, ``import``/``from ... import`` (relative ones too) and ``importlib.import_module("relaxtune...")``.
Each module's layer must be above the layer of everything it imports, and no modules import each other in a
cycle, not even within one part of the package or through an import hidden inside a function.
"""

import ast
from pathlib import Path

import relaxtune

SRC = Path(relaxtune.__file__).resolve().parent

#: each part of the package and its layer; a part imports only from lower layers (or from itself)
LAYERS = {
    "relaxtune": 0, "relaxtune.state": 0, "relaxtune.atomic": 0,
    "relaxtune.neighbors": 1, "relaxtune.metrics": 1, "relaxtune.markdown": 1,
    "relaxtune.potentials": 2, "relaxtune.symmetry": 2,
    "relaxtune.calculator": 3, "relaxtune.relax": 3,
    "relaxtune.data": 4,
    "relaxtune.dft": 5,
    "relaxtune.evaluate": 6,
    "relaxtune.retention": 7,
    "relaxtune.train": 8,
    "relaxtune.report": 9,
    "relaxtune.cli": 10, "relaxtune.__main__": 11,
}

def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)] = path
    return out


MODULES = _module_files()


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The modules one AST node imports (a submodule where ``from PACKAGE import NAME`` names one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        rest = [a for a in node.names if f"{base}.{a.name}" not in MODULES]
        return submodules + ([base] if rest else [])
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                 or isinstance(node.func, ast.Name) and node.func.id == "import_module")):
        return [node.args[0].value]
    return []


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every relaxtune import in the package."""
    out = []
    for module, path in MODULES.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            out += [(module, name, node.lineno) for name in _imported_names(node, module, is_package)
                    if name.split(".")[0] == "relaxtune"]
    return out


def _cycles(edges: list[tuple[str, str, int]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (or a module importing itself), sorted."""
    graph: dict[str, set[str]] = {}
    for m, t, _ in edges:
        graph.setdefault(m, set()).add(t)
        graph.setdefault(t, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in graph[node]:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_part_has_a_layer():
    parts = {_part(m) for m, _, _ in _imports()} | {_part(t) for _, t, _ in _imports()}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


def test_every_import_names_a_module_of_the_package():
    unknown = [f"{m}:{line} imports {t}" for m, t, line in _imports() if t not in MODULES]
    assert unknown == []


def test_imports_point_down_the_layers():
    upward = [f"{m}:{line} imports {t}" for m, t, line in _imports()
              if _part(m) != _part(t) and LAYERS[_part(t)] >= LAYERS[_part(m)]]
    assert upward == []


def test_no_import_cycles():
    edges = _imports()
    where = {(m, t): f"{m}:{line} imports {t}" for m, t, line in edges}
    cycles = [[where[(m, t)] for m in group for t in group if (m, t) in where] for group in _cycles(edges)]
    assert cycles == []


def test_the_cycle_check_finds_cycles_inside_functions():
    edges = [("relaxtune.a", "relaxtune.b", 1), ("relaxtune.b", "relaxtune.c", 9), ("relaxtune.c", "relaxtune.a", 40),
             ("relaxtune.c", "relaxtune.d", 2), ("relaxtune.e", "relaxtune.e", 3)]
    assert _cycles(edges) == [["relaxtune.a", "relaxtune.b", "relaxtune.c"], ["relaxtune.e"]]
    inside_a_function = ast.parse("def f():\n    from relaxtune.data import pairs, load_pairs\n")
    names = [n for node in ast.walk(inside_a_function) for n in _imported_names(node, "relaxtune.data.registry", False)]
    assert names == ["relaxtune.data.pairs", "relaxtune.data"]
